"""Layer-by-layer calibration: peak memory ≈ one decoder layer (float32) + one batch of activations.

The batches are embedded once (only the embedding rows they use are read, block by block), then
each decoder layer is built from the config on the meta device (calibration/layers.py), its weights
read lazily from the source checkpoint (SourceCheckpoint, one tensor at a time) and assigned, every batch is run through
it with hooks recording statistics, and its outputs become the next layer's inputs. On CUDA the next
layer's tensors are read from disk (in the source dtype, by a thread with its own reader:
device_compute.ReadAhead) while the devices run this one, so the host holds two layers there at most. Hidden states
between layers stay in memory up to SPILL_BYTES and are spilled to a temporary directory beyond.
lm_head and the final norm are needed only by smoothquant_alpha auto's second step.

Everything runs in float32, with the eager attention implementation and the model's own causal-mask
and rotary helpers, so the statistics equal those of a whole-model forward with hooks. It runs on CPU,
or on the devices given (`--device`, recipe_runner/devices.py): the layer's weights are moved there,
each batch runs on devices[b % n] with its hidden states kept there while they fit (else in pinned
host memory), and every batch's statistics come back to CPU, where they are folded in batch order
(calibration/stats.py LayerFold), so that any number of devices gives the bytes of one. The AWQ and α
searches run on the first device, and so do the α candidates' hidden states (calibration/alpha_select.py),
which advance through each layer once its statistics are complete; after the last layer the final norm
and the LM head (read in blocks) score them. With CUDA, deterministic algorithms only
(device_compute.deterministic).
"""
from __future__ import annotations

import copy
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from recipe_runner.calibration.alpha_select import advance_candidates, candidate_streams, select
from recipe_runner.calibration.layers import (assemble_layer, decoder_classes, embed, hf_config, layer_forward,
                                              layer_tensors)
from recipe_runner.calibration.stats import (
    AWQ_SEARCH_TOKENS,
    AwqResult,
    BatchPartials,
    CalibrationStats,
    LayerCollector,
    LayerFold,
)
from recipe_runner.device_compute import ReadAhead, default_device, deterministic, host, is_cuda, reads_ahead
from recipe_runner.calibration.tokens import Batch
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.io.work_progress import NO_PROGRESS, WorkProgress
from recipe_runner.models import layout_for
from recipe_runner.quant.awq import DEFAULT_GRID, search_scales
from recipe_runner.quant.sq_auto import AlphaChoice, AlphaSearch
from recipe_runner.quant.sq_search import group_errors

SPILL_BYTES = 1 << 30
Log = Callable[[str], None]


@dataclass(frozen=True)
class RunnerOptions:
    collect_mean: bool = False  # x_absmean, for AWQ
    awq_group_size: int | None = None  # run the AWQ scale search with this group size
    alpha_search: AlphaSearch | None = None  # run SmoothQuant's α search (smoothquant_alpha auto)
    awq_grid: int = DEFAULT_GRID  # AWQ's α candidates k / awq_grid; 1: α = 0 only, s = 1 (awq_search false)
    spill_bytes: int = SPILL_BYTES
    read_ahead: bool | None = None  # read layer i+1 while layer i runs (device_compute.ReadAhead); None: on CUDA


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


def run_calibration(model_dir: Path, batches: list[Batch], options: RunnerOptions = RunnerOptions(),
                    log: Log = lambda _: None, *, trust_remote_code: bool = False,
                    progress: WorkProgress = NO_PROGRESS,
                    devices: Sequence[torch.device] | None = None) -> CalibrationStats:
    """Statistics of every decoder-layer linear over `batches`, computed one layer at a time on
    `devices` (default: CPU; several: batch b runs on devices[b % n]); `progress` counts samples ×
    layers done. The statistics come back on CPU, the same bytes whatever the devices' count."""
    devices = list(devices or [torch.device("cpu")])
    with deterministic(devices):
        return _calibrate(model_dir, batches, options, log, trust_remote_code, progress, devices)


def _calibrate(model_dir: Path, batches: list[Batch], options: RunnerOptions, log: Log, trust_remote_code: bool,
               progress: WorkProgress, devices: list[torch.device]) -> CalibrationStats:
    config = hf_config(model_dir, trust_remote_code=trust_remote_code)
    layer_cls, rotary_cls = decoder_classes(config)
    reader = SourceCheckpoint(model_dir)
    layout = layout_for(read_model_config(model_dir))
    rotaries = _replicas(rotary_cls(config=config), devices)
    hidden_size = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden_size // config.num_attention_heads
    total = sum(b.ids.numel() for b in batches) * hidden_size * 4
    resident = _fits_on_devices(total, devices)
    # hidden states stay where their batch runs while they fit there; else in host memory (spilled beyond)
    states = HiddenStates(0 if resident else total, options.spill_bytes)
    home = (lambda t: t) if resident else host
    stats = CalibrationStats()
    stats.alpha_search = options.alpha_search
    quota = -(-_search_tokens(options) // len(batches))
    samples = sum(b.ids.shape[0] for b in batches)
    count = _Count(progress, samples * config.num_hidden_layers)
    layers_ahead = _layer_loader(model_dir, config, layer_cls, layout, reader, options, devices)
    try:
        for b, batch in enumerate(batches):
            h = embed(reader, layout.embedding.hf, batch.ids)
            states.put(b, h.to(devices[b % len(devices)]) if resident else h)
        candidates = candidate_streams(reader, layout, batches, options.alpha_search, devices[0])
        reader.release()
        for index in range(config.num_hidden_layers):
            layer = assemble_layer(config, layer_cls, layers_ahead.take(index), index, devices[0])
            layers = _replicas(layer, devices)
            collectors = [LayerCollector(lay, layout, with_mean=options.collect_mean, sample_quota=quota,
                                         head_dim=head_dim) for lay in layers]
            runs = [_Replica(d, lay, rot, col) for d, lay, rot, col in zip(devices, layers, rotaries, collectors)]
            fold = LayerFold(layout, options.collect_mean)
            with torch.no_grad():
                _run_batches(config, runs, batches, states, home, fold, count)
            for collector in collectors:
                collector.close()
            for proj, s in fold.result().items():
                stats.linears[(index, proj)] = s
            if fold.k_rope_absmax is None:
                raise RuntimeError("k_proj saw no calibration tokens")
            stats.k_rope_absmax[index] = fold.k_rope_absmax
            first = runs[0]  # the searches run on the first device, on the rows gathered there in batch order
            if options.awq_group_size:
                progress.note(f"AWQ scale search, layer {index + 1}/{config.num_hidden_layers}")
                _awq_search(first.layer, fold, stats, index, options.awq_group_size, options.awq_grid, first.device)
            if options.alpha_search is not None:
                progress.note(f"SmoothQuant alpha search, layer {index + 1}/{config.num_hidden_layers}")
                _alpha_search(first.layer, fold, stats, index, options.alpha_search, first.device)
                progress.note(f"SmoothQuant alpha candidates, layer {index + 1}/{config.num_hidden_layers}")
                advance_candidates(config, first.layer, first.rotary, layout, stats, index, candidates)
            del layer, layers, collectors, runs, fold
            log(f"calibrated layer {index + 1}/{config.num_hidden_layers}")
        if candidates is not None:
            stats.alpha_selection = select(config, reader, layout, candidates, devices[0])
            log(f"SmoothQuant alpha: kept {stats.alpha_selection.chosen} (next-token loss over "
                f"{stats.alpha_selection.tokens} calibration tokens)")
    finally:
        states.close()
        layers_ahead.close()
    return stats


def _layer_loader(model_dir: Path, config, layer_cls, layout, reader: SourceCheckpoint, options: RunnerOptions,
                  devices: list[torch.device]) -> ReadAhead[dict[str, torch.Tensor]]:
    """Each decoder layer's source tensors, in order: read ahead in a thread with its own reader where
    device_compute.reads_ahead says so."""
    ahead = reads_ahead(devices, options.read_ahead)
    source = SourceCheckpoint(model_dir) if ahead else reader

    def load(index: int) -> dict[str, torch.Tensor]:
        return layer_tensors(config, layer_cls, source, layout.hf_layer_tensor(index, ""), index)

    return ReadAhead(load, config.num_hidden_layers, ahead)


@dataclass
class _Replica:
    """One device's copy of the layer being calibrated, with its rotary embedding and hooks."""

    device: torch.device
    layer: torch.nn.Module
    rotary: torch.nn.Module
    collector: LayerCollector


class _Count:
    """samples × layers done, for `progress` (updated from the driving thread only)."""

    def __init__(self, progress: WorkProgress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def add(self, samples: int) -> None:
        self.done += samples
        self.progress.update(self.done, self.total, "samples×layers")


def _replicas(module: torch.nn.Module, devices: list[torch.device]) -> list[torch.nn.Module]:
    """`module` on each device: itself on the first (moved there), independent copies on the others
    (each replica carries its own hooks)."""
    copies = [copy.deepcopy(module).to(d) for d in devices[1:]]
    return [module.to(devices[0]), *copies]


def _fits_on_devices(total_bytes: int, devices: list[torch.device]) -> bool:
    """Whether each CUDA device can keep its share of the hidden states (half its free memory at most:
    the layer, its activations and the searches need the rest). On CPU the host's own limit applies."""
    if not is_cuda(devices):
        return False
    share = -(-total_bytes // len(devices))
    return all(share <= torch.cuda.mem_get_info(d)[0] // 2 for d in devices)


def _run_batch(config, run: _Replica, batch: Batch, h: torch.Tensor) -> tuple[torch.Tensor, BatchPartials]:
    """One batch through the replica's layer on its device: its output and statistics, both still there."""
    run.collector.mask = batch.mask.to(run.device)
    out = layer_forward(config, run.layer, run.rotary, h.to(run.device, non_blocking=True), run.collector)
    return out, run.collector.take()


def _threaded(devices: list[torch.device]) -> bool:
    """One thread per device only for several CUDA devices: CPU "devices" share the same cores."""
    return len(devices) > 1 and is_cuda(devices)


def _run_batches(config, runs: list[_Replica], batches: list[Batch], states: HiddenStates,
                 home: Callable[[torch.Tensor], torch.Tensor], fold: LayerFold, count: _Count) -> None:
    """Every batch through the layer, batch b on runs[b % n], folding the statistics in batch order.
    On CPU (however many "devices") the batches run one after the other, in order; on several CUDA
    devices one thread per device runs its share, and the driver folds each batch's partials once
    every earlier batch's are folded."""
    cpu, searching = torch.device("cpu"), runs[0].device

    def one(b: int) -> BatchPartials:
        run = runs[b % len(runs)]
        out, partials = _run_batch(config, run, batches[b], states.get(b))
        states.put(b, home(out))
        return partials.to(cpu, searching)

    if not _threaded([r.device for r in runs]):
        for b in range(len(batches)):
            fold.add(one(b))
            count.add(batches[b].ids.shape[0])
        return
    finished: queue.Queue = queue.Queue()

    def share(i: int) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                for b in range(i, len(batches), len(runs)):
                    finished.put((b, one(b)))
        except BaseException as exc:  # handed to the driver, which re-raises it
            finished.put((-1, exc))

    threads = [threading.Thread(target=share, args=(i,), daemon=True) for i in range(len(runs))]
    for t in threads:
        t.start()
    pending: dict[int, BatchPartials] = {}
    for b in range(len(batches)):  # fold in batch order, whichever device finished first
        while b not in pending:
            got, partials = finished.get()
            if got < 0:
                raise partials
            pending[got] = partials
        fold.add(pending.pop(b))
        count.add(batches[b].ids.shape[0])
    for t in threads:
        t.join()


def _awq_search(layer: torch.nn.Module, fold: LayerFold, stats: CalibrationStats, index: int,
                group_size: int, grid: int, device: torch.device) -> None:
    """On `device`, where `layer` and the kept rows are; the scales come back to CPU."""
    with torch.no_grad(), default_device(device):
        for group in fold.layout.groups:
            weights = [layer.get_submodule(p).weight for p in group.projections]
            x_mean = stats.linears[(index, group.first)].x_absmean.to(device)
            result = search_scales(fold.group_inputs(group.first), weights, x_mean, group_size, grid)
            stats.awq[(index, group.first)] = AwqResult(result.alpha, result.scales.cpu(), list(result.errors))


def _search_tokens(options: RunnerOptions) -> int:
    """Input rows a search keeps per input group and layer (0: no search, nothing kept)."""
    if options.awq_group_size:
        return AWQ_SEARCH_TOKENS
    return options.alpha_search.tokens if options.alpha_search is not None else 0


def _alpha_search(layer: torch.nn.Module, fold: LayerFold, stats: CalibrationStats, index: int,
                  search: AlphaSearch, device: torch.device) -> None:
    """Per input group, the α of the grid whose W8A8 output is closest to the float output (quant/sq_search.py),
    on `device`: the layer's statistics are copied there (on CPU: the same objects)."""
    here = stats.layer_on(index, device)
    with torch.no_grad(), default_device(device):
        for group in fold.layout.groups:
            weights = {p: layer.get_submodule(p).weight for p in group.projections}
            errors = group_errors(here, index, group.projections, weights, fold.group_inputs(group.first), search)
            stats.alphas[(index, group.first)] = AlphaChoice.pick(search.grid, errors)
