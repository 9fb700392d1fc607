"""The HF export stages (export-hf-modelopt, export-hf-compressed-tensors): one quantized Hugging Face
checkpoint each, from the source weights, the convert stage's dtype and the calibrate stage's
statistics. The formats themselves live in hfexport/; the stage's registry entry names its target."""
from __future__ import annotations

from recipe_runner.calibration.stats import read_stats
from recipe_runner.hfexport.export import export_checkpoint
from recipe_runner.quant.settings import QuantSettings
from recipe_runner.stages.convert import read_model_facts
from recipe_runner.stages.registry import STAGES, StageJob


def run_export_hf(job: StageJob) -> None:
    settings = QuantSettings.from_params(job.params)
    model = read_model_facts(job.inputs["convert"])
    stats = read_stats(job.inputs["calibrate"]) if "calibrate" in job.inputs else None
    export_checkpoint(job.inputs["source"], stats, settings, STAGES[job.stage].target, model["dtype"], job.out_dir)
