"""CPU reference forwards for `verify`: the TensorRT-LLM LLaMA decoder run from a checkpoint
directory alone (model.py), and the Hugging Face source run layer by layer (hf_model.py)."""
from recipe_runner.reference.checkpoint import CheckpointError
from recipe_runner.reference.hf_model import HFLayerwiseModel
from recipe_runner.reference.model import ReferenceModel

__all__ = ["CheckpointError", "HFLayerwiseModel", "ReferenceModel"]
