"""The convert stage: the model's facts, read once (config, tensor names, dtypes, shapes) and the
checkpoint dtype, as model.json; no tensor is read. Later stages read it instead of the source's
config again."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recipe_runner.pipeline.resolve import ResolvedPlan
    from recipe_runner.store.entry import Entry

MODEL_FILE = "model.json"


def run_convert(resolved: "ResolvedPlan", entries: dict[str, "Entry"], data_dir: Path, workers: int) -> None:
    """Validate the source against its config.json and fix the checkpoint dtype (no tensors read)."""
    from recipe_runner.hf.config import read_model_config
    from recipe_runner.hf.reader import SourceCheckpoint
    from recipe_runner.trtllm.config import resolve_dtype

    model = read_model_config(resolved.source_dir)
    source = SourceCheckpoint(resolved.source_dir)
    source.validate(model)
    dtype = resolve_dtype(resolved.plan.recipe.get("source.dtype"), model.torch_dtype)
    tensors = {n: {"dtype": str(source.dtype(n)).removeprefix("torch."), "shape": list(source.shape(n))}
               for n in source.names()}
    text = json.dumps({"model_config": asdict(model), "dtype": dtype, "tensors": tensors}, sort_keys=True, indent=1)
    (data_dir / MODEL_FILE).write_text(text + "\n", encoding="utf-8")
