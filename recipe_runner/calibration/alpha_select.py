"""`smoothquant_alpha: auto`, second step: the candidate the model's own next-token loss keeps (what the
search is, and why a second step: quant/sq_auto.py).

Every candidate (each group's own choice, or one grid α for the whole model) carries its own hidden
states for the first `select_tokens` calibration tokens. They advance one decoder layer at a time, in
lockstep with calibration (each layer's weights are read once): once a layer's statistics and first-step
choices exist, its projections are fake-quantized as the checkpoint will quantize them (quant/sq_search.py's
W8A8 simulation: smoothed int8 weights, static or per-token int8 inputs) and each candidate's states run
through it. After the last layer, the final norm and the LM head, read in vocabulary blocks, give each
candidate's mean next-token negative log-likelihood (float64 sums in a fixed order: the same inputs give
the same losses).

Memory: one hidden state per candidate (22 × 2048 tokens × hidden float32: 100 MB for hidden 576,
1.5 GB for a 70B model's 8192), one fake-quantized copy of the layer, one block of the LM head.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from recipe_runner.calibration.layers import build_layer, decoder_classes, embed, hf_config, layer_forward
from recipe_runner.calibration.stats import CalibrationStats
from recipe_runner.calibration.tokens import Batch
from recipe_runner.device_compute import default_device, deterministic
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.models import layout_for
from recipe_runner.models.layout import ModelLayout
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.quant.sq_auto import PER_LAYER, AlphaSearch, AlphaSelection, Candidate
from recipe_runner.quant.sq_search import dequantized_weight, quantized_input, search_quantizer
from recipe_runner.reference.model import rms_norm

LOGIT_ELEMENTS = 1 << 24  # one LM-head block's logits for one candidate: 64 MiB of float32


class FakeQuantLinear(torch.nn.Module):
    """A projection as the W8A8 engine computes it: Q_a(x / s) · Q_w(W · diag(s))ᵀ (+ bias)."""

    def __init__(self, dequantized: torch.Tensor, bias: torch.Tensor | None, scaling, dynamic: bool):
        super().__init__()
        self.dequantized, self.bias, self.scaling, self.dynamic = dequantized, bias, scaling, dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(quantized_input(x, self.scaling, self.dynamic), self.dequantized, self.bias)


def candidate_alpha(candidate: Candidate, stats: CalibrationStats, layer: int, first: str) -> float:
    return stats.alphas[(layer, first)].alpha if candidate == PER_LAYER else float(candidate)


@contextmanager
def fake_quantized(layer: torch.nn.Module, layout: ModelLayout, stats: CalibrationStats, index: int,
                   search: AlphaSearch, candidate: Candidate) -> Iterator[None]:
    """`layer` (decoder layer `index`) with every projection swapped for its W8A8 simulation at the
    candidate's α; the float projections are back on exit."""
    originals: dict[str, torch.nn.Module] = {}
    try:
        with torch.no_grad():
            _swap(layer, layout, stats, index, search, candidate, originals)
        yield
    finally:
        for name, module in originals.items():
            parent, attr = _parent(layer, name)
            setattr(parent, attr, module)


def _swap(layer: torch.nn.Module, layout: ModelLayout, stats: CalibrationStats, index: int, search: AlphaSearch,
          candidate: Candidate, originals: dict[str, torch.nn.Module]) -> None:
    dynamic = QuantSettings(search.algo).algorithm.activations == "dynamic"
    for group in layout.groups:
        quantizer = search_quantizer(search.algo, candidate_alpha(candidate, stats, index, group.first))
        modules = {p: layer.get_submodule(p) for p in group.projections}
        scaling = quantizer.scale_group(stats, index, group.projections, lambda p: modules[p].weight.float())
        for name, module in modules.items():
            dequantized = dequantized_weight(quantizer, module.weight, scaling)
            parent, attr = _parent(layer, name)
            originals[name] = module
            setattr(parent, attr, FakeQuantLinear(dequantized, module.bias, scaling, dynamic))


def _parent(layer: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (layer.get_submodule(path) if path else layer), attr


def selection_batches(batches: Sequence[Batch], tokens: int) -> list[Batch]:
    """The leading rows of the calibration batches, in order, until they hold at least `tokens` real tokens."""
    kept, total = [], 0
    for batch in batches:
        rows = 0
        while rows < batch.ids.shape[0] and total < tokens:
            total += int(batch.mask[rows].sum())
            rows += 1
        if rows:
            kept.append(Batch(batch.ids[:rows], batch.mask[:rows]))
        if total >= tokens:
            break
    return kept


class CandidateStreams:
    """Each candidate's hidden states for the selection batches, advanced one decoder layer at a time."""

    def __init__(self, search: AlphaSearch, batches: list[Batch], embedded: list[torch.Tensor]):
        self.search, self.batches = search, batches
        self.states: dict[Candidate, list[torch.Tensor]] = {c: list(embedded) for c in search.candidates()}

    @classmethod
    def embedded(cls, reader: SourceCheckpoint, layout: ModelLayout, search: AlphaSearch, batches: list[Batch],
                 device: torch.device) -> CandidateStreams:
        """Every candidate starting from the embeddings of `batches`, on `device`."""
        return cls(search, batches, [embed(reader, layout.embedding.hf, b.ids).to(device) for b in batches])

    def advance(self, layer: torch.nn.Module, layout: ModelLayout, stats: CalibrationStats, index: int,
                forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every candidate's states through decoder layer `index`, fake-quantized at the candidate's α;
        `forward(h)` runs one batch's states through `layer`."""
        with torch.no_grad():
            for candidate, states in self.states.items():
                with fake_quantized(layer, layout, stats, index, self.search, candidate):
                    self.states[candidate] = [forward(h) for h in states]

    def select(self, norm: torch.Tensor, eps: float, vocab: int,
               head_rows: Callable[[int, int], torch.Tensor]) -> AlphaSelection:
        """Each candidate's mean next-token loss after the final norm (`norm`, float32) and the LM head,
        whose rows [r0, r1) `head_rows` reads (float32, on the device of the states)."""
        ids = [b.ids[:, 1:].to(norm.device) for b in self.batches]
        valid = [(b.mask[:, :-1] & b.mask[:, 1:]).to(norm.device) for b in self.batches]
        targets = torch.cat([i[v] for i, v in zip(ids, valid)])
        rows = {c: torch.cat([rms_norm(h[:, :-1][v], norm, eps) for h, v in zip(states, valid)])
                for c, states in self.states.items()}
        lse = {c: torch.full((targets.numel(),), float("-inf"), dtype=torch.float32, device=norm.device)
               for c in rows}
        picked = {c: torch.zeros(targets.numel(), dtype=torch.float32, device=norm.device) for c in rows}
        step = max(1, LOGIT_ELEMENTS // max(1, targets.numel()))
        with torch.no_grad():
            for r0 in range(0, vocab, step):
                r1 = min(vocab, r0 + step)
                block = head_rows(r0, r1)
                here = (targets >= r0) & (targets < r1)
                columns = targets[here] - r0  # the same for every candidate
                for c, x in rows.items():
                    logits = x @ block.T
                    lse[c] = torch.logaddexp(lse[c], torch.logsumexp(logits, dim=1))
                    picked[c][here] = logits[here, columns]
        losses = tuple((c, float((lse[c] - picked[c]).double().sum()) / targets.numel()) for c in rows)
        return AlphaSelection(targets.numel(), losses)


# ---- in calibration, and on any text -------------------------------------------------------------

def candidate_streams(reader: SourceCheckpoint, layout, batches: list[Batch], search: AlphaSearch | None,
                      device: torch.device) -> CandidateStreams | None:
    """The α search's second step starts from the embeddings of its selection batches (on the first device)."""
    if search is None:
        return None
    return CandidateStreams.embedded(reader, layout, search, selection_batches(batches, search.select_tokens), device)


def advance_candidates(config, layer: torch.nn.Module, rotary: torch.nn.Module, layout, stats: CalibrationStats,
                       index: int, candidates: CandidateStreams) -> None:
    """Every candidate's states through layer `index`, on the layer's device (the layer's statistics are
    copied there, as for the α search)."""
    device = next(layer.parameters()).device
    here = stats.layer_on(index, device)
    with default_device(device):
        candidates.advance(layer, layout, here, index, lambda h: layer_forward(config, layer, rotary, h))


def select(config, reader: SourceCheckpoint, layout, candidates: CandidateStreams,
           device: torch.device) -> AlphaSelection:
    """The candidate of the smallest next-token loss: final norm and LM head (the embedding when tied) from the source."""
    head = layout.lm_head.hf if layout.lm_head.hf in reader else layout.embedding.hf
    norm = reader.read(layout.final_norm.hf).float().to(device)
    try:
        with default_device(device):
            return candidates.select(norm, config.rms_norm_eps, reader.shape(head)[0],
                                     lambda r0, r1: reader.read(head, 0, r0, r1).float().to(device))
    finally:
        reader.release()


def candidate_losses(model_dir: Path, batches: list[Batch], stats: CalibrationStats, *,
                     device: torch.device = torch.device("cpu"), trust_remote_code: bool = False) -> AlphaSelection:
    """The α search's second step on any text (held-out text, for bench/sq_alpha.py and the tests): each
    candidate's mean next-token loss over every real token of `batches`, with the statistics and
    per-group choices of a finished search (`stats`), one layer at a time as in calibration."""
    if stats.alpha_search is None:
        raise ValueError("the statistics hold no SmoothQuant alpha search")
    config = hf_config(model_dir, trust_remote_code=trust_remote_code)
    layer_cls, rotary_cls = decoder_classes(config)
    reader = SourceCheckpoint(model_dir)
    layout = layout_for(read_model_config(model_dir))
    rotary = rotary_cls(config=config).to(device)
    streams = CandidateStreams.embedded(reader, layout, stats.alpha_search, batches, device)
    with deterministic([device]):
        for index in range(config.num_hidden_layers):
            layer = build_layer(config, layer_cls, reader, layout.hf_layer_tensor(index, ""), index, device)
            advance_candidates(config, layer, rotary, layout, stats, index, streams)
        return select(config, reader, layout, streams, device)
