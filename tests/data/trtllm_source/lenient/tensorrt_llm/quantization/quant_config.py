# Synthetic fixture (not TensorRT-LLM code).
import dataclasses
from typing import Optional

from .mode import QuantAlgo


@dataclasses.dataclass
class QuantConfig:
    quant_algo: Optional[QuantAlgo] = None
    group_size: Optional[int] = 128
    new_switch: bool = False

    @classmethod
    def from_dict(cls, config: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in config.items() if k in known}
        return cls(**kept)
