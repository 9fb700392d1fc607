"""A FAKE trtllm-build for tests. It is not TensorRT-LLM and builds no engine.

It parses its arguments with an argparse parser generated from the option list recorded from
the real trtllm-build of the release it pretends to be (FAKE_TRTLLM_RELEASE, set by
install_fake_toolchain from its version; recipe_runner/data/trtllm/<release>.json), so any option,
value type or choice that release's command would reject is rejected here too. It then loads the
checkpoint's config.json the way that release does (QuantConfig(**quantization) and
Mapping(**mapping) raise on a key the release's classes lack) and writes marker files named like
the real engines.
Environment: FAKE_TRTLLM_FAIL=1 makes it fail the way a real build can (after some output);
FAKE_TRTLLM_FAIL_ON="--max_batch_size 9" fails only when the arguments contain that text.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "recipe_runner" / "data" / "trtllm"
ENUM_CHOICES = {"KVCacheType": ["continuous", "paged", "disabled"]}  # KVCacheType.from_string, case-insensitive


def facts() -> dict:
    return json.loads((DATA / f"{os.environ['FAKE_TRTLLM_RELEASE']}.json").read_text())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtllm-build (FAKE)", allow_abbrev=False)
    for raw in facts()["trtllm_build_options"]:
        flags = [raw["flag"], *raw.get("aliases", [])]
        if raw.get("action") == "store_true":
            p.add_argument(*flags, dest=raw["dest"], action="store_true")
            continue
        kwargs = {"dest": raw["dest"]}
        if raw.get("nargs"):
            kwargs["nargs"] = raw["nargs"]
        if raw.get("type") == "int":
            kwargs["type"] = int
        if raw.get("type") in ENUM_CHOICES:
            kwargs["type"], kwargs["choices"] = str.lower, ENUM_CHOICES[raw["type"]]
        elif raw.get("choices"):
            kwargs["choices"] = raw["choices"]
        p.add_argument(*flags, **kwargs)
    return p


def load_problem(config: dict, release: dict) -> str | None:
    """The TypeError the release's QuantConfig(**d) / Mapping(**d) raise on this config.json, if any."""
    fields = {f["name"] for f in release["quant_config"]["fields"]}
    for key in config.get("quantization") or {}:
        if key not in fields:
            return f"QuantConfig.__init__() got an unexpected keyword argument '{key}'"
    parameters = {p["name"] for p in release["mapping"]["parameters"]}
    for key in config.get("mapping") or {}:
        if key not in parameters:
            return f"Mapping.__init__() got an unexpected keyword argument '{key}'"
    return None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.checkpoint_dir or not args.output_dir:
        print("error: --checkpoint_dir and --output_dir are required", file=sys.stderr)
        return 2
    ckpt, out = Path(args.checkpoint_dir), Path(args.output_dir)
    config = json.loads((ckpt / "config.json").read_text())
    problem = load_problem(config, facts())
    if problem:  # what the release's from_dict would raise
        print(f"TypeError: {problem}", file=sys.stderr)
        return 1
    world = config["mapping"]["world_size"]
    print(f"[TensorRT-LLM][FAKE] building {config['architecture']} for {world} rank(s)", flush=True)
    fail_on = os.environ.get("FAKE_TRTLLM_FAIL_ON")
    if os.environ.get("FAKE_TRTLLM_FAIL") or (fail_on and fail_on in " ".join(argv)):
        print("[TensorRT-LLM][ERROR] FAKE failure: out of GPU memory while building rank 0", flush=True)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        weights = (ckpt / f"rank{rank}.safetensors").read_bytes()
        marker = {"fake": True, "rank": rank, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                  "argv": argv}
        (out / f"rank{rank}.engine").write_text("FAKE-TRTLLM-ENGINE " + json.dumps(marker, sort_keys=True))
        print(f"[TensorRT-LLM][FAKE] rank {rank}: engine written", flush=True)
    (out / "config.json").write_text(json.dumps({"fake": True, "pretrained_config": config}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
