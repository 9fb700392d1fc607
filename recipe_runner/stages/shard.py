"""Shard stage: execute a ConvertManifest into config.json + rank{N}.safetensors.

Memory: tensors are produced in row blocks of at most `max_block_bytes` (read lazily from the
source, converted to the output dtype, appended to the rank file), so peak memory is one block —
never a whole rank file, and not even a whole large tensor. Parts that are plain byte copies of
the source (whole tensors and row slices in the same dtype: most of a checkpoint) do not pass
through this process at all: the kernel copies them (os.copy_file_range, as cp does).

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
from typing import TYPE_CHECKING, Iterator, Mapping

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
from recipe_runner.stages.manifest import (
    Concat,
    ConvertManifest,
    RankPlan,
    Read,
    Source,
    SourceTensor,
    TensorPlan,
    Zeros,
    source_tensors_of,
)
from recipe_runner.trtllm.config import config_json_bytes
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.releases import release_named
from recipe_runner.io.safetensors_writer import (
    Block,
    FileRange,
    SafetensorsStreamWriter,
    TensorSpec,
)

if TYPE_CHECKING:
    from recipe_runner.stages.registry import StageJob

DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024
CONFIG_FILE = "config.json"


# ---- evaluating source expressions in row blocks ---------------------------------------------


def _row_blocks(rows: int, row_bytes: int, max_block_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, max_block_bytes // max(row_bytes, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _read_blocks(src: Read, reader: SourceCheckpoint, max_block_bytes: int
                 ) -> Iterator[torch.Tensor]:
    shape = reader.shape(src.tensor)
    if len(shape) < 2:
        yield reader.read(src.tensor, src.dim, src.start, src.stop)
        return
    index = [slice(None)] * len(shape)
    if src.dim is not None:
        index[src.dim] = slice(src.start, src.stop)
    r_start, r_stop, _ = index[0].indices(shape[0])
    # a row block of a column slice still touches whole source rows: size blocks by those
    src_row_bytes = reader.dtype(src.tensor).itemsize * _numel(shape[1:])
    for r0, r1 in _row_blocks(r_stop - r_start, src_row_bytes, max_block_bytes):
        index[0] = slice(r_start + r0, r_start + r1)
        yield reader.read_block(src.tensor, tuple(index))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def iter_source_blocks(src: Source, reader: SourceCheckpoint, dtype: torch.dtype,
                       max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """Row blocks (dim 0) whose concatenation is `src`; Zeros come out in `dtype`, reads in
    their source dtype."""
    if isinstance(src, Zeros):
        row_bytes = _numel(src.shape[1:]) * dtype.itemsize
        for r0, r1 in _row_blocks(src.shape[0], row_bytes, max_block_bytes):
            yield torch.zeros((r1 - r0, *src.shape[1:]), dtype=dtype)
    elif isinstance(src, Read):
        yield from _read_blocks(src, reader, max_block_bytes)
    else:
        for part in src.parts:
            yield from iter_source_blocks(part, reader, dtype, max_block_bytes)


def _zero_copy(src: Source, reader: SourceCheckpoint, dtype: torch.dtype) -> FileRange | None:
    """`src` as a byte range of a source file when it needs no transform at all: a whole tensor
    or a row slice, already in the output dtype. Copied by the kernel, like cp."""
    if not isinstance(src, Read) or reader.dtype(src.tensor) != dtype:
        return None
    shape = reader.shape(src.tensor)
    start, stop = 0, (shape[0] if shape else 1)
    if src.dim == 0:
        start, stop, _ = slice(src.start, src.stop).indices(shape[0])
    elif src.dim is not None:  # a slice of an inner dim is contiguous only when it is all of it
        if slice(src.start, src.stop).indices(shape[src.dim])[:2] != (0, shape[src.dim]):
            return None
    return reader.row_range(src.tensor, start, stop)


def iter_output_blocks(plan: TensorPlan, reader: SourceCheckpoint,
                       max_block_bytes: int = DEFAULT_BLOCK_BYTES, *, zero_copy: bool = True
                       ) -> Iterator[Block]:
    """The bytes of `plan`, in order: tensors in the output dtype, or (zero_copy) file ranges
    for parts that are plain byte copies of the source."""
    dtype = getattr(torch, plan.dtype)
    parts = plan.source.parts if isinstance(plan.source, Concat) else (plan.source,)
    for part in parts:
        direct = _zero_copy(part, reader, dtype) if zero_copy else None
        if direct is not None:
            yield direct
            continue
        for block in iter_source_blocks(part, reader, dtype, max_block_bytes):
            yield _convert_block(block, dtype, plan.name)


def _convert_block(block: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if block.dtype == dtype:
        return block
    out = block.to(dtype)
    # float16 has a smaller range than bfloat16/float32: refuse silent infinities
    if dtype == torch.float16 and torch.isinf(out).sum() > torch.isinf(block).sum():
        peak = block.abs().max().item()
        raise UserError(f"tensor {name}: values up to {peak:.4g} overflow float16 (max 65504); "
                        "convert with dtype bfloat16 or float32")
    return out


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


def write_rank(rank: RankPlan, source_dir: CheckpointDirs, work_dir: str | Path,
               expected_source: dict[str, SourceTensor], final_dir: str | Path,
               max_block_bytes: int = DEFAULT_BLOCK_BYTES, zero_copy: bool = True) -> str:
    """Write `work_dir/rankN.safetensors` (complete or not at all); returns its file name.

    Top-level so worker processes can run it. `final_dir` is only used in error messages.
    `source_dir` may list several directories (quantized tensors first, the HF source last).
    """
    reader = open_checkpoint(source_dir)
    _check_source(rank, reader, expected_source)
    specs = [TensorSpec(t.name, getattr(torch, t.dtype), t.shape) for t in rank.tensors]
    by_name = {t.name: t for t in rank.tensors}
    path = Path(work_dir) / rank.file_name
    try:
        with SafetensorsStreamWriter(path, specs) as writer:
            for spec in writer.layout.order:
                blocks = iter_output_blocks(by_name[spec.name], reader, max_block_bytes,
                                            zero_copy=zero_copy)
                writer.write_blocks(spec.name, blocks)
                reader.release()
    except OSError as e:
        raise _disk_error(e, Path(final_dir) / rank.file_name, rank.nbytes) from None
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
            for rank in manifest.ranks:
                write_rank(rank, source_dir, tmp, _source_for(manifest, rank), out_dir,
                           max_block_bytes, zero_copy)
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
