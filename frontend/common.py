"""What every importer returns."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import relax

from ..ir import TensorSpec


@dataclass
class ImportedModel:
    """One converted model: a Relax function (inputs first, then weights with TVM's
    ``params`` attribute holding their values), its input specs and output names."""

    name: str
    func: relax.Function
    inputs: list[TensorSpec]
    output_names: list[str]
    source: str
