# Synthetic fixture (not TensorRT-LLM code).
from dataclasses import dataclass, field


@dataclass
class BuildConfig:
    max_batch_size: int = 16
    max_seq_len: int = None
    output_cache: str = field(default='cache.bin')
    extras: list = field(default_factory=list)
