"""The layer-by-layer forward all of verify's models share: the source (hf_model.py), a TensorRT-LLM
checkpoint (model.py) and a quantized HF checkpoint (hf_quantized.py) each say how to embed, load
one decoder layer, run it and apply the head; this module runs them, one layer in memory at a time.

Hidden states are float32 [T, H] per sequence (batch 1, no padding) in every model, so two models'
streams can be compared layer by layer (verify/trace.py).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch


class LayerwiseModel(Protocol):
    num_layers: int

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """[T, H] float32 per sequence."""

    def load_layer(self, index: int) -> Any:
        """Decoder layer `index`, ready to run (its weights read now, freed when dropped)."""

    def run_layer(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] → [T, H] through one decoder layer."""

    def head(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """[T, vocab_size] float32 logits per sequence."""


def forward_logits(model: LayerwiseModel, sequences: list[list[int]],
                   step: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    """[len(seq), vocab_size] float32 logits of each sequence; `step()` after each (layer, sequence)."""
    with torch.no_grad():
        hidden = model.embed(sequences)
        for index in range(model.num_layers):
            layer = model.load_layer(index)
            hidden = [stepped(model.run_layer(layer, h), step) for h in hidden]
            del layer  # free this layer before the next one is read
        return model.head(hidden)


class LayerwiseLogits:
    """`logits` for a LayerwiseModel (the three verify models inherit it)."""

    def logits(self, sequences: list[list[int]], step: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
        """[len(seq), vocab_size] float32 logits for each token sequence; `step()` after each
        (layer, sequence)."""
        return forward_logits(self, sequences, step)  # type: ignore[arg-type]  # subclasses are LayerwiseModels


def stepped(value: torch.Tensor, step: Callable[[], None]) -> torch.Tensor:
    """`value`, after calling `step()`: counts one unit of work inside a comprehension."""
    step()
    return value
