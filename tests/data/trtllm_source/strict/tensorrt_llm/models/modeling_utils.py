# Synthetic fixture (not TensorRT-LLM code).
import dataclasses
from typing import List, Optional

from ..mapping import Mapping
from ..quantization import QuantAlgo


@dataclasses.dataclass
class QuantConfig:
    quant_algo: Optional[QuantAlgo] = None
    group_size: Optional[int] = 64
    exclude_modules: Optional[List[str]] = None

    @classmethod
    def from_dict(cls, config: dict):
        return cls(**config)


class PretrainedConfig:

    def __init__(self, *, architecture: str, dtype: str, vocab_size: Optional[int] = None,
                 norm_epsilon: float = 1e-5, mapping=None, quantization=None, **kwargs):
        self.architecture = architecture
        if isinstance(mapping, dict):
            mapping = Mapping.from_dict(mapping)
        self.mapping = mapping
        if quantization is None:
            quantization = QuantConfig()
        elif isinstance(quantization, dict):
            quantization = QuantConfig.from_dict(quantization)
        self.quantization = quantization
        for key, value in kwargs.items():
            setattr(self, key, value)

    @classmethod
    def from_dict(cls, config: dict):
        return cls(**config)

    @classmethod
    def from_json_file(cls, config_file: str):
        return cls.from_dict({})
