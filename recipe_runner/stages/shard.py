"""Shard stage: execute a ConvertManifest into config.json + rank{N}.safetensors.

Memory: tensors are produced in row blocks of at most `max_block_bytes` (stages/shard_blocks.py:
mapped from the source, cast into a reused output buffer, appended to the rank file), so peak memory
is a few blocks — never a whole rank file, and not even a whole large tensor. Parts that are plain
byte copies of the source (whole tensors and row slices in the same dtype: most of a checkpoint) do
not pass through this process at all: the kernel copies them (os.copy_file_range, as cp does). The
writer writes and hashes on two threads while the next block is cast (io/sink.py), and records each
rank file's sha256 on it (io/written.py), so the cache never reads the files back to hash them.

Atomicity: everything is written into a temp dir beside `out_dir` and renamed into place only
when complete. Inside it each rank file is written as `rankN.safetensors.partial` and renamed when
done. On any failure the temp dir is removed and an existing `out_dir` is left untouched.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from recipe_runner.errors import SourceModelError, UserError
from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.layered import CheckpointDirs, open_checkpoint
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.stages.convert import read_model_facts
from recipe_runner.quant.sq_auto import REPORT_FILE as SQ_REPORT_FILE
from recipe_runner.stages.quantized import QuantizedArtifact, read_artifact
from recipe_runner.stages.shard_plan import plan_rank_tensors
from recipe_runner.store.publish import swap_into_place
from recipe_runner.stages.manifest import ConvertManifest, RankPlan, SourceTensor, source_tensors_of
from recipe_runner.stages.shard_blocks import DEFAULT_BLOCK_BYTES, cast_threads, is_byte_copy, iter_output_blocks
from recipe_runner.trtllm.config import config_json_bytes
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.releases import release_named
from recipe_runner.io.safetensors_writer import FileRange, SafetensorsStreamWriter, TensorSpec

if TYPE_CHECKING:
    from recipe_runner.stages.registry import StageJob

CONFIG_FILE = "config.json"


# ---- writing one rank --------------------------------------------------------------------------


def _check_source(rank: RankPlan, reader: SourceCheckpoint,
                  expected: dict[str, SourceTensor]) -> None:
    for plan in rank.tensors:
        for name in source_tensors_of(plan.source):
            want = expected[name]
            got = SourceTensor(str(reader.dtype(name)).removeprefix("torch."),
                               tuple(reader.shape(name)))
            if got != want:
                raise SourceModelError(
                    f"{reader.info(name).file}: tensor '{name}' is {got.dtype} {list(got.shape)} "
                    f"but was {want.dtype} {list(want.shape)} when the conversion was planned; "
                    "the source changed — plan again"
                )


def _disk_error(e: OSError, final_path: Path, needed: int) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"no space left on device writing {final_path} ({needed / 1e6:.1f} MB); free space "
            f"on that disk or choose an output directory on another one — nothing was published"
        )
    return UserError(f"could not write {final_path}: {e.strerror or e}")


Replicas = dict  # (source, dtype, shape) of a computed tensor -> FileRange of its bytes in an earlier rank file
REPLICA_MIN_BYTES = 1 << 20  # smaller tensors are cheaper to compute again than to look up and copy


def write_rank(rank: RankPlan, source_dir: CheckpointDirs, work_dir: str | Path,
               expected_source: dict[str, SourceTensor], final_dir: str | Path,
               max_block_bytes: int = DEFAULT_BLOCK_BYTES, zero_copy: bool = True,
               replicas: Replicas | None = None) -> str:
    """Write `work_dir/rankN.safetensors` (complete or not at all); returns its file name.

    Top-level so worker processes can run it. `final_dir` is only used in error messages.
    `source_dir` may list several directories (quantized tensors first, the HF source last).
    `replicas` (ranks written one after another): a tensor an earlier rank file of this checkpoint
    already holds, cast or cut the same way (the replicated embedding of a cast), is copied from
    those bytes by the kernel rather than computed again; this rank's are added to it.
    """
    reader = open_checkpoint(source_dir)
    _check_source(rank, reader, expected_source)
    specs = [TensorSpec(t.name, getattr(torch, t.dtype), t.shape) for t in rank.tensors]
    by_name = {t.name: t for t in rank.tensors}
    path = Path(work_dir) / rank.file_name
    made: Replicas = {}
    try:
        with cast_threads(), SafetensorsStreamWriter(path, specs) as writer:
            for spec in writer.layout.order:
                plan = by_name[spec.name]
                earlier = (replicas or {}).get((plan.source, plan.dtype, plan.shape))
                if earlier is not None:
                    writer.write_blocks(spec.name, [earlier])
                    continue
                blocks = iter_output_blocks(plan, reader, max_block_bytes, zero_copy=zero_copy, staging=writer.staging)
                writer.write_blocks(spec.name, blocks)
                reader.release()
                if plan.nbytes >= REPLICA_MIN_BYTES and not (zero_copy and is_byte_copy(plan, reader)):
                    start, stop = writer.layout.offsets[spec.name]
                    made[(plan.source, plan.dtype, plan.shape)] = FileRange(path, len(writer.layout.prefix) + start,
                                                                            stop - start)
    except OSError as e:
        raise _disk_error(e, Path(final_dir) / rank.file_name, rank.nbytes) from None
    if replicas is not None:
        replicas.update(made)  # only once the file is complete, under its final name
    return rank.file_name


# ---- the whole checkpoint ----------------------------------------------------------------------


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty dir or a previous checkpoint may be replaced — never unrelated files."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if not (p.name == CONFIG_FILE or (p.name.startswith("rank")
                                                           and p.name.endswith(".safetensors"))))
        if foreign:
            raise UserError(
                f"{out_dir} exists and holds files that are not part of a TensorRT-LLM "
                f"checkpoint ({', '.join(foreign[:5])}); refusing to replace it — choose an "
                "empty or new output directory"
            )


class _RayRankPool:
    """Rank files as Ray tasks, when the shard stage itself runs in a Ray cluster (the temp dir is
    in the cache, which every node mounts)."""

    def __init__(self, ray):
        self.remote = ray.remote(write_rank)

    def submit(self, fn, *args):
        return self.remote.remote(*args).future()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _in_ray_cluster():
    ray = sys.modules.get("ray")  # imported only by the Ray executor, never here
    return ray if ray is not None and ray.is_initialized() else None


def _rank_pool(workers: int):
    ray = _in_ray_cluster()
    if ray is not None:
        return _RayRankPool(ray)
    # spawn, not fork: torch's thread pools do not survive fork reliably
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _write_ranks_parallel(manifest: ConvertManifest, source_dir: CheckpointDirs, tmp: Path,
                          out_dir: Path, workers: int, max_block_bytes: int,
                          zero_copy: bool) -> None:
    with _rank_pool(workers) as pool:
        futures = [pool.submit(write_rank, r, source_dir, tmp, _source_for(manifest, r), out_dir,
                               max_block_bytes, zero_copy) for r in manifest.ranks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()
            raise failed[0].exception()  # type: ignore[misc]


def _source_for(manifest: ConvertManifest, rank: RankPlan) -> dict[str, SourceTensor]:
    names = {n for t in rank.tensors for n in source_tensors_of(t.source)}
    return {n: manifest.source[n] for n in sorted(names)}


def write_checkpoint(manifest: ConvertManifest, source_dir: CheckpointDirs, out_dir: str | Path, *,
                     workers: int = 1, max_block_bytes: int = DEFAULT_BLOCK_BYTES,
                     zero_copy: bool = True, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write config.json + every rank file of `manifest` to `out_dir`, atomically.

    `workers > 1` writes ranks in parallel processes; the bytes do not depend on it, nor on
    `max_block_bytes` or `zero_copy` (kernel copies of untransformed byte ranges).
    `source_dir`: the HF source, or (quantize artifact, HF source) for quantized checkpoints.
    `extra_files`: name -> bytes written beside config.json (smoothquant.json; trtllm-build reads neither).
    """
    source_dir = Path(source_dir) if isinstance(source_dir, (str, Path)) else tuple(Path(d) for d in source_dir)
    out_dir = Path(out_dir).absolute()
    if workers < 1:
        raise UserError(f"workers={workers} must be >= 1")
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir.parent}: {e.strerror or e}") from None
    needed = manifest.nbytes
    free = shutil.disk_usage(out_dir.parent).free
    if free < needed:  # fail in a second rather than after writing most of the checkpoint
        raise UserError(f"no space left on device for {out_dir}: the checkpoint needs "
                        f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free space or "
                        "choose an output directory on another disk")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            (tmp / CONFIG_FILE).write_bytes(config_json_bytes(manifest.config))
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
        except OSError as e:
            raise _disk_error(e, out_dir / CONFIG_FILE, 0) from None
        n_workers = min(workers, manifest.world_size)
        if n_workers == 1 and not (_in_ray_cluster() and manifest.world_size > 1):
            replicas: Replicas = {}
            for rank in manifest.ranks:
                write_rank(rank, source_dir, tmp, _source_for(manifest, rank), out_dir,
                           max_block_bytes, zero_copy, replicas)
        else:
            _write_ranks_parallel(manifest, source_dir, tmp, out_dir, n_workers,
                                  max_block_bytes, zero_copy)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def run_shard(job: "StageJob") -> None:
    """Write config.json + rank{N}.safetensors for the recipe's mapping, streaming from the source."""
    mapping = ParallelMapping.from_recipe(job.params)
    source = job.inputs["source"]
    if "quantize" in job.inputs:  # quantized tensors and scales (read beside the source) and their config
        quantized = read_artifact(job.inputs["quantize"])
        dirs: tuple[Path, ...] | Path = (job.inputs["quantize"], source)
        dtype, reader = quantized.dtype, open_checkpoint(dirs)
    else:
        quantized, dirs, reader = None, source, SourceCheckpoint(source)
        dtype = read_model_facts(job.inputs["convert"])["dtype"]
    manifest = plan_rank_tensors(read_model_config(source), reader, mapping=mapping, dtype=dtype, quantized=quantized,
                                 release=release_named(job.params["tensorrt_llm"]))
    write_checkpoint(manifest, dirs, job.out_dir, workers=job.workers, extra_files=_reports(quantized))


def _reports(quantized: QuantizedArtifact | None) -> dict[str, bytes]:
    """What a user reads beside config.json: the searched SmoothQuant α (smoothquant_alpha auto)."""
    if quantized is None or quantized.smoothquant is None:
        return {}
    return {SQ_REPORT_FILE: (json.dumps(quantized.smoothquant, indent=1, sort_keys=True) + "\n").encode()}
