# Synthetic fixture (not TensorRT-LLM code).
from ..modeling_utils import PretrainedConfig


class LLaMAConfig(PretrainedConfig):

    def __init__(self, *, rotary_base: float = 10000.0, rotary_scaling: dict = None, **kwargs):
        self.rotary_base = rotary_base
        self.rotary_scaling = rotary_scaling
        self.legacy = kwargs.pop('legacy_flag', 0)
        super().__init__(**kwargs)
