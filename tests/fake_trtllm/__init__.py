"""Install the FAKE trtllm-build and nvidia-smi (tests only; never on a user's PATH)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

PROGRAM = Path(__file__).with_name("trtllm_build.py")


def install_fake_toolchain(root: Path, monkeypatch: pytest.MonkeyPatch, *, version: str = "0.14.0",
                           gpu: str = "NVIDIA H100 80GB HBM3", compute_cap: str = "9.0") -> Path:
    """Put fake `trtllm-build` and `nvidia-smi` first on PATH, and a tensorrt-llm distribution
    record (version only) on PYTHONPATH so the version query finds `version`."""
    bin_dir, site = root / "bin", root / "site"
    bin_dir.mkdir(parents=True, exist_ok=True)
    build = bin_dir / "trtllm-build"
    build.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = 'trtllm-build'\n"
                     f"runpy.run_path({str(PROGRAM)!r}, run_name='__main__')\n")
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{gpu}, {compute_cap}'\necho '{gpu}, {compute_cap}'\n")
    for script in (build, smi):
        script.chmod(0o755)
    dist = site / f"tensorrt_llm-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tensorrt-llm\nVersion: {version}\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(site))
    # the recorded release whose options and config classes the fake takes (its version's major.minor)
    monkeypatch.setenv("FAKE_TRTLLM_RELEASE", ".".join(version.split(".")[:2]))
    return bin_dir
