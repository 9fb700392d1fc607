"""The layer-by-layer error trace: where in the model a checkpoint departs from its source.

The source and the checkpoint run in lockstep, one decoder layer of each in memory. For each layer
i, with h the source's hidden states entering it:

  layer_error       ‖ckpt_i(h) − src_i(h)‖ / ‖src_i(h) − h‖: the checkpoint's layer on the *source's*
                    inputs, against what the source layer adds to the residual stream. It isolates
                    the layer: a swapped head, gate/up or rank slice in layer 17 shows at 17 alone,
                    while rounding and quantization noise stay at a level that is flat across layers.
  cumulative_error  ‖h_ckpt − h_src‖ / ‖h_src‖ after the layer, each model on its own stream: how the
                    errors of all layers so far add up (what the logits finally see).

Norms are over every position of every sequence. `first_jump` names the first layer whose
layer_error stands out from the model's own level (JUMP_FACTOR × the median over layers, and above
JUMP_FLOOR): "layer 17's error is 40× the others'" instead of "KL too high".

The checkpoint's layers run twice (on their own stream and on the source's), so verify with the
trace costs 1.5× the two forwards it replaces.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from recipe_runner.reference.layerwise import LayerwiseModel, stepped
from recipe_runner.verify.metrics import round_figure

JUMP_FACTOR = 3.0  # quantization noise varies ~2.5x across layers of the test models; a layout bug 4x+
JUMP_FLOOR = 1e-3  # float32 noise of an exact conversion is ~1e-6: nothing below this is a jump


@dataclass(frozen=True)
class LayerError:
    layer: int
    layer_error: float
    cumulative_error: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "layer_error": round_figure(self.layer_error),
                "cumulative_error": round_figure(self.cumulative_error)}


@dataclass(frozen=True)
class LayerTrace:
    layers: tuple[LayerError, ...]

    @property
    def max_layer_error(self) -> float:
        return max((e.layer_error for e in self.layers), default=0.0)

    @property
    def worst_layer(self) -> int | None:
        return max(self.layers, key=lambda e: e.layer_error).layer if self.layers else None

    @property
    def first_jump(self) -> int | None:
        """The first layer whose error stands out from the others' (None: none does)."""
        if not self.layers:
            return None
        level = statistics.median(e.layer_error for e in self.layers)
        return next((e.layer for e in self.layers
                     if e.layer_error > max(JUMP_FACTOR * level, JUMP_FLOOR)), None)

    def to_dict(self) -> dict:
        return {"first_jump": self.first_jump, "worst_layer": self.worst_layer, "jump_factor": JUMP_FACTOR,
                "layers": [e.to_dict() for e in self.layers]}


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.to(torch.float64) ** 2).sum() for t in tensors)))


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return _norm([x - y for x, y in zip(a, b)])


def run_lockstep(source: LayerwiseModel, checkpoint: LayerwiseModel, sequences: list[list[int]],
                 step: Callable[[], None] = lambda: None) -> tuple[list[torch.Tensor], list[torch.Tensor], LayerTrace]:
    """(source logits, checkpoint logits, trace); `step()` after each of the 3 × layers × sequences
    layer runs."""
    errors = []
    with torch.no_grad():
        h_src, h_ckpt = source.embed(sequences), checkpoint.embed(sequences)
        for index in range(source.num_layers):
            src_layer, ckpt_layer = source.load_layer(index), checkpoint.load_layer(index)
            out_src = [stepped(source.run_layer(src_layer, h), step) for h in h_src]
            on_src = [stepped(checkpoint.run_layer(ckpt_layer, h), step) for h in h_src]
            h_ckpt = [stepped(checkpoint.run_layer(ckpt_layer, h), step) for h in h_ckpt]
            added = _distance(out_src, h_src)  # what the source layer adds to the residual stream
            errors.append(LayerError(index, _distance(on_src, out_src) / max(added, 1e-30),
                                     _distance(h_ckpt, out_src) / max(_norm(out_src), 1e-30)))
            h_src = out_src
            del src_layer, ckpt_layer
        return source.head(h_src), checkpoint.head(h_ckpt), LayerTrace(tuple(errors))

