"""Calibrate stage: activation statistics of the source model over the recipe's calibration set.

Its key holds exactly the calibration fields and the statistics family (not a numeric
smoothquant_alpha, not the mapping), so changing α or tp_size reuses it. With smoothquant_alpha auto
the α search runs here, on the activations, and the key holds its settings (`smoothquant_search`:
the algo whose quantization it measures, the grid, the rows kept; quant/sq_auto.py). The artifact
is small: per-channel maxima (and means) of every linear's input and output, AWQ's searched scales,
and the searched α with the error at every grid point.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from recipe_runner.calibration.dataset import locate_dataset, read_texts, sample_texts
from recipe_runner.calibration.runner import RunnerOptions, run_calibration
from recipe_runner.calibration.stats import CalibrationStats, write_stats
from recipe_runner.calibration.tokens import load_tokenizer, make_batches, tokenize
from recipe_runner.errors import UserError
from recipe_runner.hf.config import read_model_config
from recipe_runner.io.work_progress import NO_PROGRESS, WorkProgress
from recipe_runner.stages.registry import StageJob
from recipe_runner.quant.algorithms import AWQ_STATISTICS
from recipe_runner.quant.awq import DEFAULT_GRID
from recipe_runner.quant.sq_auto import AlphaSearch


@dataclass(frozen=True)
class CalibrationSettings:
    dataset: str
    dataset_path: Path | None  # `dataset` resolved against the recipe file that set it
    text_field: str = "text"
    split: str = "train"
    num_samples: int = 512
    max_seq_len: int = 512
    seed: int = 0
    batch_size: int = 1
    statistics: tuple[str, ...] = ()  # families: awq, smoothquant, amax, kv (quant/algorithms.py)
    group_size: int | None = None  # AWQ's search quantizes with this group size
    revision: str | None = None  # the snapshot of a dataset in the local HF cache (None: refs/main)
    smoothquant_search: AlphaSearch | None = None  # smoothquant_alpha auto: search α per layer and group
    awq_search: bool = True  # False: AWQ's scales all 1 (round-to-nearest with group scales)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], dataset_path: Path | None) -> CalibrationSettings:
        return cls(params["dataset"], dataset_path, params["text_field"], params["split"], params["num_samples"],
                   params["max_seq_len"], params["seed"], params["batch_size"], tuple(params.get("statistics", ())),
                   params.get("group_size"), params.get("revision"), _search(params.get("smoothquant_search")),
                   params.get("awq_search", True))


def calibrate(source_dir: Path, settings: CalibrationSettings, out_dir: Path | None = None,
              log: Callable[[str], None] = lambda _: None, *, trust_remote_code: bool = False,
              progress: WorkProgress = NO_PROGRESS, devices: Sequence[str] = ("cpu",)) -> CalibrationStats:
    """Statistics of `source_dir` over the calibration set, computed on `devices` ("cpu", "cuda:0", ...;
    several share the batches); written to `out_dir` when given."""
    cfg = read_model_config(source_dir)
    files = locate_dataset(settings.dataset, settings.dataset_path, settings.split, settings.revision)
    tokenizer = load_tokenizer(source_dir, trust_remote_code=trust_remote_code)
    texts = sample_texts(read_texts(files, settings.text_field), settings.num_samples, settings.seed)
    sequences = tokenize(tokenizer, texts, settings.max_seq_len)
    if not sequences:
        raise UserError(f"quantization.calibration.dataset: no sample of {files.description} gives any token "
                        "with the source model's tokenizer; use a dataset with text")
    batches = make_batches(sequences, settings.batch_size, cfg.vocab_size)
    awq = AWQ_STATISTICS in settings.statistics
    options = RunnerOptions(collect_mean=awq, awq_group_size=(settings.group_size or 128) if awq else None,
                            alpha_search=settings.smoothquant_search, awq_grid=DEFAULT_GRID if settings.awq_search else 1)
    stats = run_calibration(source_dir, batches, options, log, trust_remote_code=trust_remote_code, progress=progress,
                            devices=[torch.device(d) for d in devices])
    # counts only: paths would make equal statistics differ in bytes between machines
    stats.meta = {"samples": len(sequences), "batches": len(batches), "tokens": sum(b.tokens for b in batches),
                  "statistics": list(settings.statistics), "awq_group_size": options.awq_group_size}
    if not settings.awq_search:  # said only when off: searched statistics keep their bytes
        stats.meta["awq_search"] = False
    if out_dir is not None:
        write_stats(out_dir, stats)
    return stats


def _search(params: Mapping[str, Any] | None) -> AlphaSearch | None:
    return AlphaSearch.from_params(params) if params is not None else None


def run_calibrate(job: StageJob) -> None:
    """Build executor: the stage's own params (exactly what its key holds) drive it."""
    calibrate(job.inputs["source"], CalibrationSettings.from_params(job.params, job.inputs["calibration-data"]),
              job.out_dir, trust_remote_code=job.params["trust_remote_code"], progress=job.progress,
              devices=job.devices)
