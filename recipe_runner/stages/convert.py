"""The convert stage: it validates the source against its config.json and fixes the checkpoint dtype,
writing the model's facts (config, tensor names, dtypes, shapes, checkpoint dtype) as model.json; no
tensor is read. This module owns model.json: later stages read it with `read_model_facts`. The
tensors themselves are converted by the stages after it (quantize, shard, the HF exports)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from recipe_runner.hf.config import read_model_config
from recipe_runner.hf.reader import SourceCheckpoint
from recipe_runner.trtllm.config import resolve_dtype

if TYPE_CHECKING:
    from recipe_runner.stages.registry import StageJob

MODEL_FILE = "model.json"


def read_model_facts(entry_dir: Path) -> dict:
    """The convert stage's model.json from its entry: {"model_config", "dtype", "tensors"}."""
    return json.loads((entry_dir / MODEL_FILE).read_text(encoding="utf-8"))


def run_convert(job: "StageJob") -> None:
    """Validate the source against its config.json and fix the checkpoint dtype (no tensors read)."""
    model = read_model_config(job.inputs["source"])
    source = SourceCheckpoint(job.inputs["source"])
    source.validate(model)
    dtype = resolve_dtype(job.params["dtype"], model.torch_dtype)
    tensors = {n: {"dtype": str(source.dtype(n)).removeprefix("torch."), "shape": list(source.shape(n))}
               for n in source.names()}
    text = json.dumps({"model_config": asdict(model), "dtype": dtype, "tensors": tensors}, sort_keys=True, indent=1)
    (job.out_dir / MODEL_FILE).write_text(text + "\n", encoding="utf-8")
