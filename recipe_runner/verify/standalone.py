"""`recipe verify CHECKPOINT --source MODEL`: the verify stage on any TensorRT-LLM LLaMA checkpoint,
including ones other tools made."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from recipe_runner.demo import demo_prompts
from recipe_runner.devices import parse_device
from recipe_runner.errors import UserError
from recipe_runner.hf.remote_code import TRUST_FIELD, refuse_remote_code
from recipe_runner.verify.inputs import parse_token_ids, require_tokenizer


def check_limits(limits: Mapping[str, float | None]) -> dict[str, float]:
    """The limits given on the command line (None = use the default)."""
    given = {k: float(v) for k, v in limits.items() if v is not None}
    for name, value in given.items():
        if name == "min_top1_agreement" and not 0 <= value <= 1:
            raise UserError(f"--min-top1-agreement {value}: must be between 0 and 1")
        if name != "min_top1_agreement" and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be greater than 0")
    return given


def run_standalone(checkpoint: Path, source: Path, *, prompts: Sequence[str], token_ids: Sequence[str],
                   limits: Mapping[str, float | None], report_dir: Path | None,
                   echo: Callable[[str], None], device: str | None = None) -> bool:
    """Verify, print the figures, write the report if asked; True when every figure is in tolerance.

    Without prompts or token ids it runs the built-in default prompts (the demo recipe's
    verify.prompts) and says so. Bad arguments and a source without the tokenizer that text prompts
    need fail here, before torch or any model is loaded. `device`: a --device spec (recipe_runner/devices.py;
    None: $RECIPE_DEVICE, else cpu); the layers run on its first device.
    """
    # before anything loads: verify has no recipe to allow a model's own code, so it never runs it
    refuse_remote_code(source, False, remedy=f"`recipe verify` never runs a model's own code; to use it, build "
                       f"from a recipe that sets {TRUST_FIELD}: true after reviewing that code")
    tolerances = check_limits(limits)
    ids = [parse_token_ids(text) for text in token_ids]
    prompts = list(prompts)
    defaulted = not prompts and not ids
    if defaulted:
        prompts = demo_prompts()
    if prompts:
        require_tokenizer(source, "verify's default prompts (used when no --prompt or --token-ids is given) are"
                          if defaulted else "--prompt texts are")
    if defaulted:
        echo(f"no --prompt or --token-ids given: verifying on the {len(prompts)} built-in default prompts "
             f"(the demo recipe's verify.prompts): {', '.join(repr(p) for p in prompts)}")

    choice = parse_device(device)  # imports torch only for a CUDA spec
    # torch: loaded only now, so that bad arguments and a missing tokenizer fail before it
    from recipe_runner.verify.report import ReportContext, format_summary, write_report
    from recipe_runner.verify.run import verify_checkpoint

    result = verify_checkpoint(checkpoint, source, prompts=prompts, token_ids=ids,
                               tolerances=tolerances, tolerances_from="command line", device=choice.names[0])
    where = "" if choice.is_cpu else f" on {choice.kind} ({choice.names[0]})"
    echo(f"verify {checkpoint} against {source}{where}: {format_summary(result)}")
    if report_dir is not None:
        context = ReportContext(checkpoint_path=str(checkpoint), source_path=str(source))
        json_path, md_path = write_report(report_dir, result, context)
        echo(f"report: {json_path}, {md_path}")
    return result.passed
