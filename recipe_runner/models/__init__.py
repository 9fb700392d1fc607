"""Decoder families as data: one `ModelLayout` per family (layout.py), looked up by architecture.

Adding a family means adding its layout module and its architectures here; hf/config.py accepts
exactly the architectures listed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipe_runner.models.layout import ModelLayout
from recipe_runner.models.llama import LLAMA

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

# config.json `architectures[0]` -> layout
LAYOUTS: dict[str, ModelLayout] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,  # LLaMA's tensors; TensorRT-LLM converts it with the LLaMA converter
}


def layout_for(model_config: "ModelConfig") -> ModelLayout:
    """The layout of a parsed config (parse_model_config refuses architectures without one)."""
    try:
        return LAYOUTS[model_config.architecture]
    except KeyError:
        raise ValueError(f"no model layout for architecture {model_config.architecture!r}") from None


__all__ = ["LAYOUTS", "ModelLayout", "layout_for"]
