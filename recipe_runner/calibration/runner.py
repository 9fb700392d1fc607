"""Layer-by-layer calibration: peak memory ≈ one decoder layer (float32) + one batch of activations.

The batches are embedded once (only the embedding rows they use are read, block by block), then
each decoder layer is built from the config on the meta device, its weights read lazily from the
source checkpoint (SourceCheckpoint, one tensor at a time) and assigned, every batch is run through
it with hooks recording statistics, and its outputs become the next layer's inputs. Hidden states
between layers stay in memory up to SPILL_BYTES and are spilled to a temporary directory beyond.
lm_head and the final norm are never needed.

Everything runs in float32 on CPU, with the eager attention implementation and the model's own
causal-mask and rotary helpers, so the statistics equal those of a whole-model forward with hooks.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, masking_utils
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral

from recipe_runner.calibration.stats import (
    AWQ_SEARCH_TOKENS,
    AwqResult,
    CalibrationStats,
    LayerCollector,
)
from recipe_runner.calibration.tokens import Batch
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.hf.remote_code import refuse_remote_code
from recipe_runner.io.work_progress import NO_PROGRESS, WorkProgress
from recipe_runner.models import layout_for
from recipe_runner.quant.awq import DEFAULT_GRID, search_scales
from recipe_runner.quant.sq_auto import AlphaChoice, AlphaSearch
from recipe_runner.quant.sq_search import group_errors

SPILL_BYTES = 1 << 30
EMBED_BLOCK_BYTES = 64 << 20
Log = Callable[[str], None]


@dataclass(frozen=True)
class RunnerOptions:
    collect_mean: bool = False  # x_absmean, for AWQ
    awq_group_size: int | None = None  # run the AWQ scale search with this group size
    alpha_search: AlphaSearch | None = None  # run SmoothQuant's α search (smoothquant_alpha auto)
    awq_grid: int = DEFAULT_GRID  # AWQ's α candidates k / awq_grid; 1: α = 0 only, s = 1 (awq_search false)
    spill_bytes: int = SPILL_BYTES


def hf_config(model_dir: Path, *, trust_remote_code: bool = False):
    """The transformers config of the source, set up for an eager float32 CPU forward; custom config
    code (auto_map) runs only with `trust_remote_code`, passed explicitly (None would ask on stdin)."""
    refuse_remote_code(model_dir, trust_remote_code)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    config._attn_implementation = "eager"
    return config


def _decoder_classes(config):
    if config.model_type == "mistral":
        return modeling_mistral.MistralDecoderLayer, modeling_mistral.MistralRotaryEmbedding
    return modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding


def embed(reader: SourceCheckpoint, table: str, ids: torch.Tensor,
          max_block_bytes: int = EMBED_BLOCK_BYTES) -> torch.Tensor:
    """float32 embeddings of `ids` [B, T], reading only the row blocks of the embedding `table` that hold them."""
    vocab, hidden = reader.shape(table)
    rows_per_block = max(1, max_block_bytes // (hidden * 4))
    wanted = torch.unique(ids)
    out = torch.empty((*ids.shape, hidden), dtype=torch.float32)
    for r0 in range(0, vocab, rows_per_block):
        r1 = min(vocab, r0 + rows_per_block)
        in_block = wanted[(wanted >= r0) & (wanted < r1)]
        if not in_block.numel():
            continue
        block = reader.read(table, 0, r0, r1).float()
        hit = (ids >= r0) & (ids < r1)
        out[hit] = block[ids[hit] - r0]
    return out


def build_layer(config, layer_cls, reader: SourceCheckpoint, prefix: str, index: int) -> torch.nn.Module:
    """Decoder layer `index` with its weights (below `prefix`) read from the source in float32 (no double
    allocation: the module is created on the meta device and the loaded tensors are assigned)."""
    with torch.device("meta"):
        layer = layer_cls(config, index)
    state = {name: reader.read(prefix + name).float() for name, _ in layer.named_parameters()}
    reader.release()
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval()


class HiddenStates:
    """Per-batch hidden states, in memory or spilled to files when they would exceed `limit` bytes."""

    def __init__(self, total_bytes: int, limit: int):
        self._mem: dict[int, torch.Tensor] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="recipe-calib-") if total_bytes > limit else None

    def put(self, index: int, value: torch.Tensor) -> None:
        if self._tmp is None:
            self._mem[index] = value
        else:
            torch.save(value, Path(self._tmp.name) / f"h{index}.pt")

    def get(self, index: int) -> torch.Tensor:
        if self._tmp is None:
            return self._mem[index]
        return torch.load(Path(self._tmp.name) / f"h{index}.pt", weights_only=True)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _causal_mask(config, hidden: torch.Tensor, positions: torch.Tensor):
    make = (masking_utils.create_sliding_window_causal_mask if getattr(config, "sliding_window", None)
            else masking_utils.create_causal_mask)
    return make(config, hidden, None, None, positions)


def run_calibration(model_dir: Path, batches: list[Batch], options: RunnerOptions = RunnerOptions(),
                    log: Log = lambda _: None, *, trust_remote_code: bool = False,
                    progress: WorkProgress = NO_PROGRESS) -> CalibrationStats:
    """Statistics of every decoder-layer linear over `batches`, computed one layer at a time;
    `progress` counts samples × layers done."""
    config = hf_config(model_dir, trust_remote_code=trust_remote_code)
    layer_cls, rotary_cls = _decoder_classes(config)
    reader = SourceCheckpoint(model_dir)
    layout = layout_for(read_model_config(model_dir))
    rotary = rotary_cls(config=config)
    hidden_size = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden_size // config.num_attention_heads
    total = sum(b.ids.numel() for b in batches) * hidden_size * 4
    states = HiddenStates(total, options.spill_bytes)
    stats = CalibrationStats()
    stats.alpha_search = options.alpha_search
    quota = -(-_search_tokens(options) // len(batches))
    samples = sum(b.ids.shape[0] for b in batches)
    total, done = samples * config.num_hidden_layers, 0
    try:
        for b, batch in enumerate(batches):
            states.put(b, embed(reader, layout.embedding.hf, batch.ids))
        reader.release()
        for index in range(config.num_hidden_layers):
            layer = build_layer(config, layer_cls, reader, layout.hf_layer_tensor(index, ""), index)
            collector = LayerCollector(layer, layout, with_mean=options.collect_mean, sample_quota=quota,
                                       head_dim=head_dim)
            with torch.no_grad():
                for b, batch in enumerate(batches):
                    collector.mask = batch.mask
                    h = states.get(b)
                    positions = torch.arange(h.shape[1]).unsqueeze(0)
                    cos_sin = rotary(h, positions)
                    collector.rope = cos_sin  # K after RoPE = what the attention interface receives
                    out = layer(h, attention_mask=_causal_mask(config, h, positions), position_ids=positions,
                                position_embeddings=cos_sin)
                    states.put(b, out[0] if isinstance(out, tuple) else out)
                    done += batch.ids.shape[0]
                    progress.update(done, total, "samples×layers")
            for proj, s in collector.close().items():
                stats.linears[(index, proj)] = s
            if collector.k_rope_absmax is None:
                raise RuntimeError("k_proj saw no calibration tokens")
            stats.k_rope_absmax[index] = collector.k_rope_absmax
            if options.awq_group_size:
                progress.note(f"AWQ scale search, layer {index + 1}/{config.num_hidden_layers}")
                _awq_search(layer, collector, stats, index, options.awq_group_size, options.awq_grid)
            if options.alpha_search is not None:
                progress.note(f"SmoothQuant alpha search, layer {index + 1}/{config.num_hidden_layers}")
                _alpha_search(layer, collector, stats, index, options.alpha_search)
            del layer, collector
            log(f"calibrated layer {index + 1}/{config.num_hidden_layers}")
    finally:
        states.close()
    return stats


def _awq_search(layer: torch.nn.Module, collector: LayerCollector, stats: CalibrationStats, index: int,
                group_size: int, grid: int) -> None:
    with torch.no_grad():
        for group in collector.layout.groups:
            weights = [layer.get_submodule(p).weight for p in group.projections]
            x_mean = stats.linears[(index, group.first)].x_absmean
            result = search_scales(collector.group_inputs(group.first), weights, x_mean, group_size, grid)
            stats.awq[(index, group.first)] = AwqResult(result.alpha, result.scales, list(result.errors))


def _search_tokens(options: RunnerOptions) -> int:
    """Input rows a search keeps per input group and layer (0: no search, nothing kept)."""
    if options.awq_group_size:
        return AWQ_SEARCH_TOKENS
    return options.alpha_search.tokens if options.alpha_search is not None else 0


def _alpha_search(layer: torch.nn.Module, collector: LayerCollector, stats: CalibrationStats, index: int,
                  search: AlphaSearch) -> None:
    """Per input group, the α of the grid whose W8A8 output is closest to the float output (quant/sq_search.py)."""
    with torch.no_grad():
        for group in collector.layout.groups:
            weights = {p: layer.get_submodule(p).weight for p in group.projections}
            errors = group_errors(stats, index, group.projections, weights, collector.group_inputs(group.first), search)
            stats.alphas[(index, group.first)] = AlphaChoice.pick(search.grid, errors)
