# Synthetic fixture (not TensorRT-LLM code).
from typing import Optional

from ..mapping import Mapping
from ..quantization.quant_config import QuantConfig


class PretrainedConfig:

    def __init__(self, *, architecture: str, dtype: str, vocab_size: Optional[int] = None,
                 mapping=None, quantization=None, **kwargs):
        self.architecture = architecture
        self.mapping = Mapping(**(mapping or {}))
        self.quantization = QuantConfig(**(quantization or {}))
        for key in kwargs:
            print("ignoring", key)

    @classmethod
    def from_dict(cls, config: dict):
        return cls(**config)
