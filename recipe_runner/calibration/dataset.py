"""Dataset texts (calibration samples, verify's perplexity text): a local .txt (one sample per line) / .jsonl / .json file, or a dataset
snapshot in the local Hugging Face cache (its .jsonl/.json/.txt files; .parquet only when pyarrow
is importable): `revision` (a commit) selects `snapshots/<revision>`, else the one `refs/main` names.
Never downloads. Sampling is deterministic in `seed`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.hf.hub_cache import download_hint, hf_hub_cache, missing_snapshot

@dataclass(frozen=True)
class DatasetRole:
    """Which recipe section names a dataset, for the fields messages point at."""

    section: str  # "quantization.calibration", "verify.perplexity"
    noun: str  # what its samples are for: "calibration", "perplexity"

    def field(self, name: str) -> str:
        return f"{self.section}.{name}"


CALIBRATION = DatasetRole("quantization.calibration", "calibration")
PERPLEXITY = DatasetRole("verify.perplexity", "perplexity")
FIELD = CALIBRATION.field("dataset")
REVISION_FIELD = CALIBRATION.field("revision")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
DATA_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")
KNOWN_SPLITS = ("train", "validation", "valid", "val", "test")


@dataclass(frozen=True)
class DatasetFiles:
    """Where the samples come from: `files` in order; `description` for messages."""

    description: str
    files: tuple[Path, ...]
    root: Path  # paths in keys are relative to this
    revision: str | None = None  # the snapshot (commit) of a dataset in the HF cache; None for a local file


def looks_like_path(value: str) -> bool:
    """A file path rather than a hub dataset id ("name" or "org/name")."""
    return (value.endswith(DATA_SUFFIXES) or value.startswith((".", "/", "~")) or value.count("/") > 1
            or "\\" in value)


def hf_datasets_cache() -> Path:
    """Datasets live in the same hub cache as models."""
    return hf_hub_cache()


def _snapshot(dataset_id: str, revision: str | None = None, role: DatasetRole = CALIBRATION) -> Path | None:
    """The dataset's snapshot in the local HF cache: `snapshots/<revision>`, else the one refs/main
    names (or the only one); None when the cache has no snapshot of it; UserError when it cannot tell."""
    repo = hf_datasets_cache() / ("datasets--" + dataset_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if revision is not None:
        if (snapshots / revision).is_dir():
            return snapshots / revision
        if not snapshots.is_dir():
            return None
        raise UserError(f"{role.field('revision')}: dataset {dataset_id!r} at revision {revision} is "
                        f"{missing_snapshot(repo, revision)}; fetch it once with "
                        f"{download_hint(dataset_id, revision, dataset=True)} or set revision to one it holds")
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{role.field('dataset')}: the local Hugging Face cache {repo.parent} holds {len(found)} snapshots of "
                        f"dataset {dataset_id!r} ({', '.join(p.name for p in found)}) and no refs/main naming "
                        f"one; set {role.field('revision')} to the one to use")
    return None


def _split_files(files: list[Path], root: Path, split: str, dataset_id: str,
                 role: DatasetRole = CALIBRATION) -> list[Path]:
    """The files of `split`: those naming it in their path; all files when none names any split."""
    def parts(p: Path) -> set[str]:
        return set(re.split(r"[/\\._-]", str(p.relative_to(root)).lower()))

    chosen = [f for f in files if split.lower() in parts(f)]
    if chosen:
        return chosen
    if any(parts(f) & set(KNOWN_SPLITS) for f in files):
        names = ", ".join(str(f.relative_to(root)) for f in files[:8])
        raise UserError(f"{role.field('split')}: dataset {dataset_id!r} has no files for split "
                        f"{split!r} (its files: {names}); set split to one of the splits it has")
    return files


def locate_dataset(value: str, resolved_path: Path | None, split: str, revision: str | None = None,
                   role: DatasetRole = CALIBRATION) -> DatasetFiles:
    """The files of the recipe's dataset in `role`; UserError naming the field when absent."""
    field = role.field("dataset")
    if resolved_path is not None and resolved_path.is_file():
        if revision is not None:
            raise UserError(f"{role.field('revision')}: applies to a dataset in the local Hugging Face cache, and "
                            f"{resolved_path} is a local file; remove revision")
        return DatasetFiles(str(resolved_path), (resolved_path,), resolved_path.parent)
    if resolved_path is not None and looks_like_path(value):
        raise UserError(f"{field}: {role.noun} file {resolved_path} not found; create it (one sample per line "
                        "for .txt, one JSON object per line for .jsonl) or fix the path")
    snapshot = _snapshot(value, revision, role)
    if snapshot is None:
        repo = hf_datasets_cache() / ("datasets--" + value.replace("/", "--"))
        raise UserError(f"{field}: {value!r} is not a local file ({resolved_path}), and the dataset is "
                        f"{missing_snapshot(repo, revision)}; fetch it once with "
                        f"{download_hint(value, revision, dataset=True)} or point to a .txt/.jsonl file")
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise UserError(f"{field}: dataset {value!r} in the local Hugging Face cache ({snapshot}) has no "
                        ".jsonl, .json, .txt or .parquet files")
    return DatasetFiles(f"{value} ({snapshot})", tuple(_split_files(files, snapshot, split, value, role)), snapshot,
                        snapshot.name)


# ---- reading samples ---------------------------------------------------------------------------

def _record_text(record: object, text_field: str, where: str, role: DatasetRole) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise UserError(f"{where}: no field {text_field!r} (fields: {', '.join(sorted(record)[:10])}); set "
                        f"{role.field('text_field')} to the field holding the text")
    value = record[text_field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _read_jsonl(path: Path, text_field: str, role: DatasetRole) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); a .jsonl file holds one JSON "
                                "object per line") from None
            texts.append(_record_text(record, text_field, f"{path}:{number}", role))
    return texts


def _read_json(path: Path, text_field: str, role: DatasetRole) -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text_field, role)  # JSON lines saved as .json
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the single list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of objects (or JSON lines)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects (or JSON lines)")
    return [_record_text(r, text_field, f"{path}[{i}]", role) for i, r in enumerate(data)]


def _read_parquet(path: Path, text_field: str, role: DatasetRole) -> list[str]:
    try:
        import pyarrow.parquet as pq  # optional: not a dependency of recipe-runner
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow, which is not installed; install it "
                        "(pip install pyarrow) or convert the split to .jsonl") from None
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names[:10])}); "
                        f"set {role.field('text_field')}")
    return [str(v) for v in table.column(text_field).to_pylist() if v is not None]


def read_texts(files: DatasetFiles, text_field: str, role: DatasetRole = CALIBRATION) -> list[str]:
    """Every non-blank sample of the dataset, in file order."""
    texts: list[str] = []
    for path in files.files:
        try:
            if path.suffix == ".txt":
                texts += path.read_text(encoding="utf-8").splitlines()
            elif path.suffix == ".jsonl":
                texts += _read_jsonl(path, text_field, role)
            elif path.suffix == ".json":
                texts += _read_json(path, text_field, role)
            else:
                texts += _read_parquet(path, text_field, role)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{role.field('dataset')}: {files.description} holds no {role.noun} samples (it is empty or every "
                        "sample is blank); add text to it")
    return texts


def sample_texts(texts: list[str], num_samples: int, seed: int) -> list[str]:
    """`num_samples` texts drawn without replacement, in an order fixed by `seed` (all when fewer)."""
    import torch  # torch: kept off the warm path (pipeline/resolve.py imports this module)

    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order[:num_samples]]


def cached_dataset_files(value: str, revision: str | None = None) -> DatasetFiles | None:
    """Every data file of a dataset snapshot in the local HF cache (for cache keys and the lock), or None."""
    if looks_like_path(value):
        return None
    try:
        snapshot = _snapshot(value, revision)
    except UserError:
        return None
    if snapshot is None:
        return None
    files = sorted(p for p in snapshot.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    return DatasetFiles(value, tuple(files), snapshot, snapshot.name) if files else None
