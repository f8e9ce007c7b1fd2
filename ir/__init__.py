"""The unified IR: many models, one Relax module, one weight store."""

from .program import MERGED, ModelInfo, Program, TensorSpec, tensor_specs, valid_model_name
from .summary import Summary, summarize
from .weights import WeightStore, lift_constants, weight_key

__all__ = ["MERGED", "ModelInfo", "Program", "Summary", "TensorSpec", "WeightStore", "lift_constants",
           "summarize", "tensor_specs", "valid_model_name", "weight_key"]
