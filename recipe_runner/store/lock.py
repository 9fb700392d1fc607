"""`<output>/recipe.lock`: what a build resolved, written by the tool, never by hand.

The recipe says what a human wants; the lock records what was actually used and made: the
recipe's canonical hash, tool versions, every input file's size and sha256 (the source model's,
the tokenizer's and the calibration dataset's, with the dataset's id and the HF-cache snapshot
used), each stage's cache key and every published file's sha256 (design rule 6). It is JSON with sorted keys and no
timestamps, so two builds of the same recipe write byte-identical lock files, and
`recipe verify-lock` (or `verify_lock`) can recheck an output directory at any time.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from recipe_runner.errors import UserError
from recipe_runner.store.fsutil import atomic_write_text
from recipe_runner.store.hashing import FileDigest, sha256_file

LOCK_VERSION = 1
LOCK_NAME = "recipe.lock"
# The record of the build that published a generation (times, peak memory): published beside the
# lock but never listed in it, since it differs every run (pipeline.execute.build_record).
BUILD_RECORD_NAME = "build.json"

Digests = dict[str, dict[str, Any]]  # {posix relpath: {"size": int, "sha256": str}}
# "calibration" (and "perplexity", verify's dataset): {"dataset": as the recipe names it, "revision": the
#   HF-cache snapshot (commit) used, absent for a local file, "files": Digests relative to the file's
#   folder or the snapshot}
Calibration = dict[str, Any]
DATASET_SECTIONS = ("calibration", "perplexity")  # the lock's dataset inputs, each in _calibration's shape


@dataclass(frozen=True)
class LockFile:
    recipe_name: str
    recipe_path: str  # as the user gave it, not resolved: the lock must not depend on the machine
    recipe_sha256: str  # the recipe's canonical hash
    tools: dict[str, str] = field(default_factory=dict)
    sources: Digests = field(default_factory=dict)
    stages: list[dict[str, str]] = field(default_factory=list)  # [{"name", "key"(, "device")}] in run order
    outputs: Digests = field(default_factory=dict)
    tokenizer: Digests | None = None  # the source's tokenizer files, when a stage reads them
    calibration: Calibration | None = None  # when a stage reads calibration data
    perplexity: Calibration | None = None  # when verify measures perplexity on a dataset

    def to_dict(self) -> dict[str, Any]:
        data = {
            "lock_version": LOCK_VERSION,
            "recipe": {"name": self.recipe_name, "path": self.recipe_path, "sha256": self.recipe_sha256},
            "tools": {str(k): str(v) for k, v in self.tools.items()},
            "sources": _digests(self.sources),
            # "device": the kind a computing stage ran on, only when not cpu (pipeline/execute.make_lock)
            "stages": [{k: s[k] for k in ("name", "key", "device") if k in s} for s in self.stages],
            "outputs": _digests(self.outputs),
        }
        if self.tokenizer is not None:
            data["tokenizer"] = _digests(self.tokenizer)
        for section in DATASET_SECTIONS:
            if getattr(self, section) is not None:
                data[section] = _calibration(getattr(self, section), section)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LockFile":
        """Parse a lock file; ValueError says what is wrong with it."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("lock_version") != LOCK_VERSION:
            raise ValueError(f"lock_version {data.get('lock_version')!r} is not {LOCK_VERSION} "
                             "(written by another recipe-runner version?)")
        recipe = _require(data, "recipe", dict)
        stages = _require(data, "stages", list)
        if not all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("key"), str)
                   for s in stages):
            raise ValueError("stages: every item needs a string name and key")
        return cls(
            recipe_name=_require(recipe, "name", str), recipe_path=_require(recipe, "path", str),
            recipe_sha256=_require(recipe, "sha256", str), tools=dict(_require(data, "tools", dict)),
            sources=_digests(_require(data, "sources", dict)), stages=[dict(s) for s in stages],
            outputs=_digests(_require(data, "outputs", dict)),
            tokenizer=_digests(_require(data, "tokenizer", dict)) if "tokenizer" in data else None,
            **{section: _calibration(_require(data, section, dict), section)
               for section in DATASET_SECTIONS if section in data},
        )


def _require(data: Mapping[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected a {kind.__name__}, got {type(value).__name__}")
    return value


def _digests(files: Mapping[str, Any]) -> Digests:
    """Normalize {name: FileDigest | {"size", "sha256"}} to sorted plain dicts."""
    out: Digests = {}
    for name, f in files.items():
        if isinstance(f, FileDigest):
            f = f.to_dict()
        if not (isinstance(f, Mapping) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)):
            raise ValueError(f"{name}: expected {{size, sha256}}, got {f!r}")
        out[str(name)] = {"size": f["size"], "sha256": f["sha256"]}
    return dict(sorted(out.items()))


def _calibration(section: Mapping[str, Any], name: str = "calibration") -> Calibration:
    """Check and normalize a lock's dataset section `name` (calibration, perplexity)."""
    dataset, revision = section.get("dataset"), section.get("revision")
    if not isinstance(dataset, str):
        raise ValueError(f"{name}.dataset: expected a string, got {type(dataset).__name__}")
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"{name}.revision: expected a string, got {type(revision).__name__}")
    out: Calibration = {"dataset": dataset, "files": _digests(_require(section, "files", dict))}
    if revision is not None:
        out["revision"] = revision
    return out


def write_lock(path: Path | str, lock: LockFile) -> None:
    """Write the lock atomically (readers never see half a lock)."""
    atomic_write_text(Path(path), lock.to_json())


def read_lock(path: Path | str) -> LockFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no lock file here; build the recipe (`recipe build`) to write one") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the lock file ({exc.strerror})") from None
    try:
        return LockFile.from_json(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path}: corrupt lock file ({exc}); rebuild the recipe to rewrite it") from None


def hash_outputs(directory: Path | str, exclude: Iterable[str] = (LOCK_NAME,)) -> Digests:
    """{posix relpath: {size, sha256}} of every file under `directory`, sorted; `exclude` lists
    relative paths to leave out (the lock itself). Reads every byte: this is the check."""
    directory = Path(directory)
    excluded = set(exclude)
    out: Digests = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(directory).as_posix()
            if rel not in excluded:
                out[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return dict(sorted(out.items()))


def differing_files(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
                    ) -> Iterator[tuple[str, Mapping[str, Any] | None, Mapping[str, Any] | None]]:
    """(name, before, after) of each file listed on one side only or with another size or sha256, by name."""
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None or new is None or (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
            yield name, old, new


def compare_outputs(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """One line per file that differs between the lock and the directory, sorted by name."""
    problems = []
    for name, want, have in differing_files(_digests(expected), _digests(actual)):
        if have is None:
            problems.append(f"{name}: missing (the lock expects {want['size']} bytes)")
        elif want is None:
            problems.append(f"{name}: extra file, not in the lock")
        elif have["size"] != want["size"]:
            problems.append(f"{name}: size {have['size']} bytes, the lock says {want['size']}")
        elif have["sha256"] != want["sha256"]:
            problems.append(f"{name}: content differs (sha256 {have['sha256'][:12]}..., "
                            f"the lock says {want['sha256'][:12]}...)")
    return problems


def compare_inputs(locked: LockFile, sources: Mapping[str, Any], tokenizer: Mapping[str, Any] | None,
                   calibration: Mapping[str, Any] | None, perplexity: Mapping[str, Any] | None = None) -> list[str]:
    """One line per input that differs from the lock: every source, tokenizer and dataset file
    (named as `compare_outputs` names them, after what it is), each dataset's id and the HF-cache
    snapshot it resolved to. `tokenizer` / `calibration` / `perplexity` are None where no stage reads them."""
    problems = [f"source {line}" for line in compare_outputs(locked.sources, sources)]
    if tokenizer is not None:
        if locked.tokenizer is None:
            problems.append("tokenizer: the lock records no tokenizer files (an earlier recipe-runner wrote it); "
                            "build without --locked once to write a lock that pins them")
        else:
            problems += [f"tokenizer {line}" for line in compare_outputs(locked.tokenizer, tokenizer)]
    for name, have in (("calibration", calibration), ("perplexity", perplexity)):
        if have is not None:
            problems += _dataset_problems(name, getattr(locked, name), _calibration(have, name))
    return problems


def _dataset_problems(name: str, want: Calibration | None, have: Calibration) -> list[str]:
    if want is None:
        return [f"{name}: the lock records no {name} data (an earlier recipe-runner wrote it, or the recipe "
                "gained it); build without --locked once to write a lock that pins it"]
    problems = []
    if have["dataset"] != want["dataset"]:
        problems.append(f"{name} dataset {have['dataset']!r}, the lock says {want['dataset']!r}")
    if have.get("revision") != want.get("revision"):
        problems.append(f"{name} revision {have.get('revision') or '(a local file)'}, the lock says "
                        f"{want.get('revision') or '(a local file)'}")
    return problems + [f"{name} {line}" for line in compare_outputs(want["files"], have["files"])]


def verify_lock(lock_path: Path | str, inputs: Callable[[LockFile], list[str]] | None = None) -> list[str]:
    """Recheck the directory holding `lock_path` against the lock's outputs; [] when it matches.
    `<output.dir>/recipe.lock` is a link into the current generation (recipe_runner.store.publish):
    the files checked are that generation's. `inputs`, given, rechecks the lock's inputs too
    (pipeline.execute.recheck_inputs: the recipe, source, tokenizer and calibration files here)."""
    lock_path = Path(lock_path)
    lock = read_lock(lock_path)
    real = Path(os.path.realpath(lock_path))
    problems = compare_outputs(lock.outputs, hash_outputs(real.parent, exclude=(real.name, BUILD_RECORD_NAME)))
    return problems + (inputs(lock) if inputs is not None else [])


def tool_versions() -> dict[str, str]:
    """Versions of everything that shapes an output (a fresh dict; callers may modify it).
    tensorrt_llm appears only where it is installed."""
    return dict(_tool_versions())


@lru_cache(maxsize=1)
def _tool_versions() -> dict[str, str]:
    # Package metadata is cheap; importing torch just for its version would cost seconds.
    versions = {"python": platform.python_version()}
    for name, dist in (("recipe_runner", "recipe-runner"), ("torch", "torch"),
                       ("transformers", "transformers"), ("safetensors", "safetensors"),
                       ("tensorrt_llm", "tensorrt-llm")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if name != "tensorrt_llm":
                versions[name] = _imported_version(name)
    return dict(sorted(versions.items()))


def _imported_version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or a package without __version__
        return "unknown"
