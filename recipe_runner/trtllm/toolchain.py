"""Finding trtllm-build, its TensorRT-LLM version and the GPUs it builds for.

Engines are not portable across GPU models or TensorRT-LLM releases, so all three
enter the engine stage's cache key and the lock file.
"""
from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from recipe_runner.errors import UserError

INSTALL_HINT = (
    "install TensorRT-LLM on a machine with an NVIDIA GPU (e.g. `pip install tensorrt-llm==0.14.0 "
    "--extra-index-url https://pypi.nvidia.com`, releases 0.12 to 1.2 ship trtllm-build), or stop at "
    "the checkpoint with `recipe build FILE --until checkpoint`"
)
_VERSION_QUERY = "import importlib.metadata as m; print(m.version('tensorrt-llm'))"


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str


@dataclass(frozen=True)
class Toolchain:
    command: tuple[str, ...]  # how to run trtllm-build
    version: str  # TensorRT-LLM version
    gpus: tuple[Gpu, ...]

    def describe(self) -> str:
        gpus = ", ".join(sorted({f"{g.name} (sm {g.compute_capability})" for g in self.gpus}))
        return f"trtllm-build from TensorRT-LLM {self.version} ({' '.join(self.command)}) on {len(self.gpus)} GPU(s): {gpus}"

    def key_material(self) -> dict:
        """What makes engines differ: the release and the GPU models (not how many, not their order)."""
        return {"tensorrt_llm": self.version,
                "gpus": sorted({f"{g.name}|{g.compute_capability}" for g in self.gpus})}


def _interpreter_of(script: Path) -> list[str] | None:
    """The interpreter named on a console script's #! line."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return None
    return shlex.split(first[2:]) if first.startswith("#!") else None


def _run(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def find_trtllm_build() -> tuple[tuple[str, ...], str] | None:
    """(command, TensorRT-LLM version) of the trtllm-build this environment would run, or None."""
    script = shutil.which("trtllm-build")
    if script is not None:
        interpreter = _interpreter_of(Path(script))
        version = _run([*interpreter, "-c", _VERSION_QUERY]) if interpreter else None
        if version is None:
            raise UserError(f"found {script} but could not read its TensorRT-LLM version (its Python "
                            f"{' '.join(interpreter or ['?'])} has no tensorrt-llm distribution); repair that install or "
                            "remove it from PATH")
        return (script,), version
    if importlib.util.find_spec("tensorrt_llm") is not None:
        version = _run([sys.executable, "-c", _VERSION_QUERY])
        if version:
            return (sys.executable, "-m", "tensorrt_llm.commands.build"), version
    return None


def detect_gpus() -> tuple[Gpu, ...]:
    """The GPUs nvidia-smi lists (name, compute capability)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    out = _run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    gpus = []
    for line in (out or "").splitlines():
        name, _, capability = line.rpartition(",")
        if name.strip():
            gpus.append(Gpu(name.strip(), capability.strip()))
    return tuple(gpus)


def require_toolchain() -> Toolchain:
    """trtllm-build and at least one GPU, or a UserError saying how to get them."""
    found = find_trtllm_build()
    if found is None:
        raise UserError(f"this recipe builds an engine, but trtllm-build is not on PATH and "
                        f"`python -m tensorrt_llm.commands.build` is not importable: {INSTALL_HINT}")
    gpus = detect_gpus()
    if not gpus:
        raise UserError(f"trtllm-build ({found[1]}) is installed but no NVIDIA GPU is visible "
                        "(`nvidia-smi --query-gpu=name,compute_cap` lists none); build engines on a GPU "
                        "machine, or stop at the checkpoint with --until checkpoint")
    return Toolchain(found[0], found[1], gpus)
