"""Activation statistics of every decoder-layer linear, and their on-disk form (the calibrate
stage's artifact: statistics.safetensors + calibration.json, small and deterministic).

Per linear (HF module names, e.g. model.layers.3.self_attn.q_proj) over all real tokens:
  x_absmax [in]   max |input| per input channel   (SmoothQuant a_j, FP8 activation amax)
  y_absmax [out]  max |output| per output channel (SmoothQuant static scales, KV cache scales)
  x_absmean [in]  mean |input| per input channel  (AWQ's x̄; collected for the awq family only)
Per AWQ group (linears sharing an input, named by the first; the model layout's input groups):
  the searched scales s [in].
Per SmoothQuant input group, with smoothquant_alpha auto (quant/sq_auto.py): the group's own choice of α
  and the output error at every grid α, and for the model each candidate's next-token loss (the
  second step, which decides the α kept), in calibration.json ("smoothquant"; absent otherwise).
Per layer: k_rope_absmax [] = max |K after RoPE| over real tokens (the key states the attention
  sees; FP8 KV k_scale of the Hugging Face targets). Stored as layers.<i>.self_attn.k_rope_absmax;
  artifacts written before it existed simply lack it (readers raise "rebuild" only when it is needed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from recipe_runner.device_compute import move
from recipe_runner.errors import UserError
from recipe_runner.io.safetensors_writer import write_safetensors
from recipe_runner.models.layout import ModelLayout
from recipe_runner.quant.sq_auto import AlphaChoice, AlphaSearch, AlphaSearchResult, AlphaSelection

STATS_FILE = "statistics.safetensors"
META_FILE = "calibration.json"
FORMAT = "recipe-runner/calibration/1"
K_ROPE_ABSMAX = "self_attn.k_rope_absmax"  # per-layer tensor name (no linear is called self_attn)
AWQ_SEARCH_TOKENS = 1024  # tokens per group for the α search (α is one number; s uses every token)
SQ_META = "smoothquant"  # calibration.json: the SmoothQuant α search's settings and results


@dataclass
class LinearStats:
    x_absmax: torch.Tensor
    y_absmax: torch.Tensor
    x_absmean: torch.Tensor | None = None


@dataclass
class AwqResult:
    alpha: float
    scales: torch.Tensor
    errors: list[float]


@dataclass
class CalibrationStats:
    linears: dict[tuple[int, str], LinearStats] = field(default_factory=dict)
    awq: dict[tuple[int, str], AwqResult] = field(default_factory=dict)  # key: (layer, first projection)
    meta: dict = field(default_factory=dict)
    k_rope_absmax: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> scalar max |K after RoPE|
    alpha_search: AlphaSearch | None = None  # smoothquant_alpha auto: the search run, and its choices
    alphas: dict[tuple[int, str], AlphaChoice] = field(default_factory=dict)  # key: (layer, first projection)
    alpha_selection: AlphaSelection | None = None  # the search's second step: per-layer or one α (sq_auto.py)

    def linear(self, layer: int, projection: str) -> LinearStats:
        try:
            return self.linears[(layer, projection)]
        except KeyError:
            raise UserError(f"the calibration statistics have no entry for layer {layer} {projection}; "
                            "the calibrate stage output does not match this model — rebuild it") from None

    def k_after_rope_amax(self, layer: int) -> float:
        try:
            return float(self.k_rope_absmax[layer])
        except KeyError:
            raise UserError(f"the calibration statistics have no post-RoPE K amax for layer {layer} (written by "
                            "an older version); rebuild the calibrate stage") from None

    def smoothquant_alpha(self, layer: int, projection: str) -> float:
        """The α `smoothquant_alpha: auto` keeps for this layer's input group (named by its first projection)."""
        choice = self.alphas.get((layer, projection))
        if choice is None or self.alpha_selection is None:
            raise UserError(f"the calibration statistics have no searched SmoothQuant alpha for layer {layer} "
                            f"{projection} (smoothquant_alpha auto); rebuild the calibrate stage")
        return self.alpha_selection.kept(choice.alpha)

    def layer_on(self, layer: int, device: torch.device) -> CalibrationStats:
        """Layer `layer`'s linear statistics copied to `device` (on CPU: the same objects), with its
        searched α, for the searches that run there."""
        return CalibrationStats(linears={k: move(s, device) for k, s in self.linears.items() if k[0] == layer},
                                alphas={k: c for k, c in self.alphas.items() if k[0] == layer})

    def alpha_result(self) -> AlphaSearchResult:
        """The α search's outcome (quant/sq_auto.py; `.report()` is smoothquant.json)."""
        if self.alpha_search is None or not self.alphas or self.alpha_selection is None:
            raise UserError("the calibration statistics hold no SmoothQuant alpha search (smoothquant_alpha auto); "
                            "rebuild the calibrate stage")
        return AlphaSearchResult(self.alpha_search, dict(self.alphas), self.alpha_selection)

    def alpha_report(self) -> dict:
        """The searched α as smoothquant.json holds them (quant/sq_auto.py)."""
        return self.alpha_result().report()

    def awq_scales(self, layer: int, projection: str) -> torch.Tensor:
        try:
            return self.awq[(layer, projection)].scales
        except KeyError:
            raise UserError(f"the calibration statistics have no AWQ scales for layer {layer} {projection}; "
                            "rebuild the calibrate stage") from None


# ---- collecting -----------------------------------------------------------------------------------
#
# A layer's statistics are gathered per batch (BatchPartials, computed wherever the batch ran) and
# folded in batch order on CPU (LayerFold), so that the result is the same whichever device ran which
# batch: maxima are order-independent; the float64 sums behind x_absmean are one per-batch partial
# each, added in batch order exactly as the one-device loop always added them; the rows kept for the
# searches are concatenated in batch order.

@dataclass
class LinearPartial:
    """One batch's statistics of one linear (real tokens only)."""

    x_absmax: torch.Tensor  # float32 [in]
    y_absmax: torch.Tensor  # float32 [out]
    x_abssum: torch.Tensor | None  # float64 [in], with_mean only
    tokens: int


def linear_partial(x: torch.Tensor, y: torch.Tensor, with_mean: bool) -> LinearPartial:
    xa, ya = x.abs().float(), y.abs().float()
    return LinearPartial(xa.amax(dim=0), ya.amax(dim=0), xa.double().sum(dim=0) if with_mean else None, x.shape[0])


@dataclass
class BatchPartials:
    """What one batch contributes to one layer's statistics."""

    linears: dict[str, LinearPartial] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # input rows kept, by group's first projection
    k_rope_absmax: torch.Tensor | None = None

    def to(self, device: torch.device, samples_device: torch.device) -> BatchPartials:
        """The statistics on `device` (CPU, where they are folded), the kept rows on `samples_device` (where
        the searches run)."""
        return BatchPartials(move(self.linears, device), move(self.samples, samples_device),
                             move(self.k_rope_absmax, device))


class _Accumulator:
    def __init__(self, with_mean: bool):
        self.x_absmax: torch.Tensor | None = None
        self.y_absmax: torch.Tensor | None = None
        self.x_abssum: torch.Tensor | None = None
        self.with_mean = with_mean
        self.tokens = 0

    def fold(self, p: LinearPartial) -> None:
        self.x_absmax = p.x_absmax if self.x_absmax is None else torch.maximum(self.x_absmax, p.x_absmax)
        self.y_absmax = p.y_absmax if self.y_absmax is None else torch.maximum(self.y_absmax, p.y_absmax)
        if self.with_mean and p.x_abssum is not None:
            self.x_abssum = p.x_abssum if self.x_abssum is None else self.x_abssum + p.x_abssum
        self.tokens += p.tokens

    def result(self) -> LinearStats:
        if self.x_absmax is None or self.y_absmax is None:
            raise RuntimeError("a linear saw no calibration tokens")
        mean = (self.x_abssum / self.tokens).float() if self.with_mean and self.x_abssum is not None else None
        return LinearStats(self.x_absmax, self.y_absmax, mean)


class LayerFold:
    """One layer's statistics, folded from BatchPartials given in batch order."""

    def __init__(self, layout: ModelLayout, with_mean: bool):
        self.layout = layout
        self.acc = {p: _Accumulator(with_mean) for p in layout.projection_names}
        self.samples: dict[str, list[torch.Tensor]] = {g.first: [] for g in layout.groups}
        self.k_rope_absmax: torch.Tensor | None = None

    def add(self, batch: BatchPartials) -> None:
        for projection, partial in batch.linears.items():
            self.acc[projection].fold(partial)
        for first, rows in batch.samples.items():
            self.samples[first].append(rows)
        m = batch.k_rope_absmax
        if m is not None:
            self.k_rope_absmax = m if self.k_rope_absmax is None else torch.maximum(self.k_rope_absmax, m)

    def result(self) -> dict[str, LinearStats]:
        return {p: a.result() for p, a in self.acc.items()}

    def group_inputs(self, first_projection: str) -> torch.Tensor:
        return torch.cat(self.samples[first_projection])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: [-x2, x1] of the two halves of the last dimension."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def keys_after_rope(k_proj_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """K after RoPE [B, T, n_kv_heads, head_dim] from the k_proj output [B, T, n_kv·head_dim] and the
    rotary tables cos/sin [B, T, head_dim] (transformers' apply_rotary_pos_emb, rotate-half convention)."""
    k = k_proj_out.reshape(*k_proj_out.shape[:-1], -1, head_dim)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (k * cos) + (rotate_half(k) * sin)


class LayerCollector:
    """Forward hooks on one decoder layer's linears (the layout's projections), recording one batch's
    BatchPartials (`take` after each batch); `mask` selects the real tokens of the batch being run.
    With `sample_quota`, also keeps evenly spaced input rows per input group for a search (AWQ's
    scales, SmoothQuant's α). With `head_dim`, also records max |K after RoPE| over the real tokens,
    from the key projection's output and the batch's rotary tables `rope` = (cos, sin), set per batch
    like `mask`. Everything stays on the device the layer runs on."""

    def __init__(self, layer: torch.nn.Module, layout: ModelLayout, *, with_mean: bool, sample_quota: int = 0,
                 head_dim: int | None = None):
        self.layout = layout
        self.mask: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.with_mean = with_mean
        self.sample_quota = sample_quota
        self.groups = {g.first for g in layout.groups}
        self.head_dim = head_dim
        self._batch = BatchPartials()
        self._handles = [layer.get_submodule(p).register_forward_hook(self._hook(p)) for p in layout.projection_names]
        if head_dim is not None:
            self._handles.append(layer.get_submodule(layout.key).register_forward_hook(self._k_rope_hook))

    def _k_rope_hook(self, module, inputs, output) -> None:
        assert self.mask is not None and self.rope is not None and self.head_dim is not None
        cos, sin = self.rope
        k = keys_after_rope(output.float(), cos.float(), sin.float(), self.head_dim)[self.mask]
        self._batch.k_rope_absmax = k.abs().amax()

    def _hook(self, projection: str):
        def hook(module, inputs, output) -> None:
            assert self.mask is not None
            x = inputs[0][self.mask]
            y = output[self.mask]
            self._batch.linears[projection] = linear_partial(x, y, self.with_mean)
            if self.sample_quota and projection in self.groups:
                k = min(self.sample_quota, x.shape[0])
                rows = (torch.arange(k, device=x.device) * x.shape[0]) // k  # evenly spaced, distinct
                self._batch.samples[projection] = x[rows].float().clone()
        return hook

    def take(self) -> BatchPartials:
        """The batch just run's partials (and a fresh record for the next batch)."""
        batch, self._batch = self._batch, BatchPartials()
        return batch

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ---- on disk --------------------------------------------------------------------------------------

def write_stats(out_dir: Path, stats: CalibrationStats) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for (layer, proj), s in sorted(stats.linears.items()):
        base = f"layers.{layer}.{proj}."
        tensors[base + "x_absmax"] = s.x_absmax.float().contiguous()
        tensors[base + "y_absmax"] = s.y_absmax.float().contiguous()
        if s.x_absmean is not None:
            tensors[base + "x_absmean"] = s.x_absmean.float().contiguous()
    awq_meta: dict[str, dict] = {}
    for (layer, proj), r in sorted(stats.awq.items()):
        tensors[f"layers.{layer}.{proj}.awq_scales"] = r.scales.float().contiguous()
        awq_meta[f"{layer}.{proj}"] = {"alpha": r.alpha, "errors": r.errors}
    for layer, amax in sorted(stats.k_rope_absmax.items()):
        tensors[f"layers.{layer}.{K_ROPE_ABSMAX}"] = amax.float().reshape(()).contiguous()
    write_safetensors(out_dir / STATS_FILE, tensors)
    meta = {"format": FORMAT, **stats.meta, "awq": awq_meta}
    if stats.alpha_search is not None:  # only then: the artifact of a numeric α stays as it was
        meta[SQ_META] = _alphas_meta(stats.alpha_search, stats.alphas, stats.alpha_selection)
    (out_dir / META_FILE).write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def read_stats(stats_dir: Path) -> CalibrationStats:
    meta = json.loads((stats_dir / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise UserError(f"{stats_dir / META_FILE}: not a {FORMAT} artifact; rebuild the calibrate stage")
    tensors = load_file(str(stats_dir / STATS_FILE))
    stats = CalibrationStats(meta={k: v for k, v in meta.items() if k not in ("awq", SQ_META)})
    if SQ_META in meta:
        stats.alpha_search, stats.alphas, stats.alpha_selection = _alphas_from_meta(meta[SQ_META])
    for name, t in tensors.items():
        _, layer, rest = name.split(".", 2)
        proj, kind = rest.rsplit(".", 1)
        key = (int(layer), proj)
        if f"{proj}.{kind}" == K_ROPE_ABSMAX:
            stats.k_rope_absmax[int(layer)] = t
        elif kind == "awq_scales":
            info = meta["awq"][f"{layer}.{proj}"]
            stats.awq[key] = AwqResult(info["alpha"], t, info["errors"])
        else:
            entry = stats.linears.setdefault(key, LinearStats(torch.empty(0), torch.empty(0)))
            setattr(entry, kind, t)
    return stats


def _alphas_meta(search: AlphaSearch, alphas: dict[tuple[int, str], AlphaChoice],
                 selection: AlphaSelection | None) -> dict:
    if selection is None:
        raise RuntimeError("the SmoothQuant alpha search ran without its second step")
    groups = {f"{layer}.{proj}": {"alpha": c.alpha, "errors": list(c.errors)}
              for (layer, proj), c in sorted(alphas.items())}
    return {"search": search.params(), "groups": groups, "selection": selection.to_json()}


def _alphas_from_meta(meta: dict) -> tuple[AlphaSearch, dict[tuple[int, str], AlphaChoice], AlphaSelection]:
    alphas = {}
    for name, info in meta["groups"].items():
        layer, proj = name.split(".", 1)
        alphas[(int(layer), proj)] = AlphaChoice(info["alpha"], tuple(info["errors"]))
    return AlphaSearch.from_params(meta["search"]), alphas, AlphaSelection.from_json(meta["selection"])
