"""Reading Hugging Face LLaMA-family sources: config normalization and lazy weight access."""
from recipe_runner.hf.config import SUPPORTED_ARCHITECTURES, ModelConfig, read_model_config

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "read_model_config"]
