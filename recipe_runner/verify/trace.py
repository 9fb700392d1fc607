"""The layer-by-layer error trace: where in the model a checkpoint departs from its source.

The source and the checkpoint run in lockstep, one decoder layer of each in memory (two on CUDA, where
the next layer of both is read while the device runs this one). For each layer
i, with h the source's hidden states entering it:

  layer_error       the checkpoint's layer on the *source's* inputs, ckpt_i(h) − src_i(h), against what
                    the source layer adds to the residual stream, src_i(h) − h. It isolates the layer: a
                    swapped head, gate/up or rank slice in layer 17 shows at 17 alone, while rounding and
                    quantization noise stay at a level that is flat across layers.
  cumulative_error  h_ckpt − h_src after the layer, each model on its own stream, against h_src: how the
                    errors of all layers so far add up (what the logits finally see).

Both are per position, then averaged over every position of every sequence (`relative_error`):
‖error_p‖ / max(‖reference_p‖, median_q ‖reference_q‖). Per position, because trained models have
massive activations: a few positions (the first token, some delimiters) whose hidden states and
updates are 100× the others'. Over all positions at once those few would be the whole norm, and a
swapped head that damages every ordinary position would look like noise (SmolLM2, layer 11: 0.003
measured that way, 0.5 per position). The median floor keeps a position where the layer happens to
add almost nothing from dividing noise by nothing.

`first_jump` names the first layer whose layer_error stands out from the model's own level
(JUMP_FACTOR × the median over layers, and above JUMP_FLOOR): "layer 17's error is 40× the others'"
instead of "KL too high".

The checkpoint's layers run twice (on their own stream and on the source's), so verify with the
trace costs 1.5× the two forwards it replaces.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from recipe_runner.device_compute import ReadAhead, default_device, deterministic, move, reads_ahead
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


def _position_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖x_p‖ of every position of every sequence, in float64: [positions]."""
    return torch.cat([t.to(torch.float64).reshape(-1, t.shape[-1]).norm(dim=1) for t in tensors])


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """mean_p ‖got_p − want_p‖ / max(‖reference_p‖, median_q ‖reference_q‖) over every position."""
    errors = _position_norms([g - w for g, w in zip(got, want)])
    scale = _position_norms(reference)
    floor = max(float(scale.median()), 1e-30)
    return float((errors / scale.clamp(min=floor)).mean())


def run_lockstep(source: LayerwiseModel, checkpoint: LayerwiseModel, sequences: list[list[int]],
                 step: Callable[[], None] = lambda: None, device: torch.device | None = None,
                 read_ahead: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], LayerTrace]:
    """(source logits, checkpoint logits, trace); `step()` after each of the 3 × layers × sequences
    layer runs. The decoder layers run on `device` (default CPU): each layer's tensors and the hidden
    states are moved there; the embeddings and the heads are computed on CPU, so the logits are CPU
    float32 whatever the device. With `read_ahead` (default: on CUDA) both models' next layer is loaded
    in a background thread while this one runs (device_compute.ReadAhead; the same tensors either way)."""
    device = device or torch.device("cpu")
    errors = []

    def load(index: int) -> tuple[Any, Any]:
        return source.load_layer(index), checkpoint.load_layer(index)

    ahead = ReadAhead(load, source.num_layers, reads_ahead([device], read_ahead))
    with torch.no_grad(), deterministic([device]), ahead as layers:
        h_src = [h.to(device) for h in source.embed(sequences)]
        h_ckpt = [h.to(device) for h in checkpoint.embed(sequences)]
        for index in range(source.num_layers):
            src_layer, ckpt_layer = move(layers.take(index), device)
            with default_device(device):
                out_src = [stepped(source.run_layer(src_layer, h), step) for h in h_src]
                on_src = [stepped(checkpoint.run_layer(ckpt_layer, h), step) for h in h_src]
                h_ckpt = [stepped(checkpoint.run_layer(ckpt_layer, h), step) for h in h_ckpt]
                added = [o - h for o, h in zip(out_src, h_src)]  # what the source layer adds to the residual stream
                errors.append(LayerError(index, relative_error(on_src, out_src, added),
                                         relative_error(h_ckpt, out_src, out_src)))
            h_src = out_src
            del src_layer, ckpt_layer
        cpu = torch.device("cpu")
        return (source.head([h.to(cpu) for h in h_src]), checkpoint.head([h.to(cpu) for h in h_ckpt]),
                LayerTrace(tuple(errors)))

