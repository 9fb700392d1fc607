"""Verify one checkpoint: run the source model and the checkpoint's reference forward on the same
token sequences, compare the logits, apply the limits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from recipe_runner.errors import UserError
from recipe_runner.hf.config import ModelConfig
from recipe_runner.io.work_progress import NO_PROGRESS, WorkProgress
from recipe_runner.reference import HFLayerwiseModel, ReferenceModel
from recipe_runner.reference.checkpoint import CheckpointConfig
from recipe_runner.reference.hf_quant_format import is_hf_checkpoint
from recipe_runner.reference.hf_quantized import HFQuantizedModel
from recipe_runner.verify.inputs import VerifyInput, prepare_inputs
from recipe_runner.verify.metrics import Figures, PerplexityFigures, compare, perplexity_figures
from recipe_runner.verify.tolerances import Failure, Tolerances, check, resolve_tolerances
from recipe_runner.verify.trace import LayerTrace, run_lockstep


@dataclass(frozen=True)
class VerifyResult:
    checkpoint: Mapping[str, object]  # format facts from config.json (quant algos, dtype, mapping)
    inputs: tuple[VerifyInput, ...]
    figures: Figures  # over all inputs
    per_input: tuple[Figures, ...]
    tolerances: Tolerances
    tolerance_sources: Mapping[str, str]  # limit -> who gave it ("recipe") or "default for <format>"
    failures: tuple[Failure, ...]
    trace: LayerTrace  # each decoder layer's error (verify/trace.py)
    perplexity: PerplexityFigures | None = None  # on verify.perplexity's held-out windows, when given

    @property
    def passed(self) -> bool:
        return not self.failures


def _check_same_model(ckpt: CheckpointConfig, source: ModelConfig, source_dir: Path) -> None:
    """A checkpoint compared with another model would fail for the wrong reason: say so instead."""
    pairs = {
        "vocab_size": (ckpt.vocab_size, source.vocab_size),
        "hidden_size": (ckpt.hidden_size, source.hidden_size),
        "intermediate_size": (ckpt.intermediate_size, source.intermediate_size),
        "num_hidden_layers": (ckpt.num_layers, source.num_hidden_layers),
        "num_attention_heads": (ckpt.num_heads, source.num_attention_heads),
        "num_key_value_heads": (ckpt.num_kv_heads, source.num_key_value_heads),
        "head_size": (ckpt.head_size, source.head_dim),
    }
    differ = [f"{name} {a} vs {b}" for name, (a, b) in pairs.items() if a != b]
    if differ:
        raise UserError(f"the checkpoint was not made from {source_dir}: " + ", ".join(differ)
                        + " (checkpoint vs source)")


def _check_same_hf_model(ckpt: ModelConfig, source: ModelConfig, source_dir: Path) -> None:
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")
    differ = [f"{n} {getattr(ckpt, n)} vs {getattr(source, n)}" for n in names
              if getattr(ckpt, n) != getattr(source, n)]
    if differ:
        raise UserError(f"the checkpoint was not made from {source_dir}: " + ", ".join(differ)
                        + " (checkpoint vs source)")


def checkpoint_facts(cfg: CheckpointConfig) -> dict[str, object]:
    return {"architecture": cfg.architecture, "dtype": cfg.dtype, "quant_algo": cfg.quant_algo,
            "kv_cache_quant_algo": cfg.kv_cache_quant_algo, "tp_size": cfg.tp_size, "pp_size": cfg.pp_size}


def verify_checkpoint(ckpt_dir: str | Path, source_dir: str | Path, *, prompts: Sequence[str] = (),
                      token_ids: Sequence[Sequence[int]] = (), tolerances: Mapping[str, float] | None = None,
                      tolerances_from: str = "given", trust_remote_code: bool = False,
                      perplexity_inputs: Sequence[VerifyInput] = (),
                      progress: WorkProgress = NO_PROGRESS, device: str = "cpu") -> VerifyResult:
    """Compare `ckpt_dir` (any TensorRT-LLM LLaMA checkpoint, or a quantized HF checkpoint in the
    hf-modelopt / hf-compressed-tensors formats this project writes) with the HF model in `source_dir`.

    `perplexity_inputs` (verify/inputs.perplexity_windows) are held-out windows: inputs like the others,
    and the text both models' perplexity is measured on. `progress` counts the layer runs of the lockstep forward (verify/trace.py),
    whose decoder layers run on `device` ("cpu", "cuda:0"; logits and figures come back to CPU).
    Raises UserError for bad inputs, CheckpointError (StageFailed) for a checkpoint whose layout
    trtllm-build would reject; a checkpoint out of tolerance is a result with failures.
    """
    source_dir, ckpt_dir = Path(source_dir), Path(ckpt_dir)
    hf_model = HFLayerwiseModel(source_dir, trust_remote_code=trust_remote_code)
    if is_hf_checkpoint(ckpt_dir):  # a (quantized) Hugging Face checkpoint: hf-modelopt, hf-compressed-tensors
        reference = HFQuantizedModel(ckpt_dir)  # reads only the configs and safetensors headers
        _check_same_hf_model(reference.model_config, hf_model.model_config, source_dir)
        facts = reference.facts()
        quant_algo, kv_algo = facts["quant_algo"], facts["kv_cache_quant_algo"]
        vocab_size = reference.model_config.vocab_size
    else:
        reference = ReferenceModel(ckpt_dir)  # reads only config.json and safetensors headers
        cfg = reference.config
        _check_same_model(cfg, hf_model.model_config, source_dir)
        facts = checkpoint_facts(cfg)
        quant_algo, kv_algo = cfg.quant_algo, cfg.kv_cache_quant_algo
        vocab_size = cfg.vocab_size
    inputs = [*prepare_inputs(source_dir, prompts, token_ids, vocab_size, trust_remote_code=trust_remote_code,
                              more=perplexity_inputs), *perplexity_inputs]
    sequences = [list(i.token_ids) for i in inputs]
    # source and checkpoint in lockstep, the checkpoint's layers also on the source's inputs:
    # 3 × layers × inputs layer runs (verify/trace.py)
    total = 3 * hf_model.model_config.num_hidden_layers * len(sequences)
    done = [0]

    def step() -> None:
        done[0] += 1
        progress.update(min(done[0], total), total, "layers×inputs")

    expected, got, trace = run_lockstep(hf_model, reference, sequences, step, torch.device(device))
    figures = compare(expected, got, sequences)
    per_input = tuple(compare([e], [g], [s]) for e, g, s in zip(expected, got, sequences))
    held_out = len(perplexity_inputs)  # the windows come last
    perplexity = perplexity_figures(expected[len(expected) - held_out:], got[len(got) - held_out:],
                                    sequences[len(sequences) - held_out:]) if held_out else None
    limits, sources = resolve_tolerances(tolerances or {}, quant_algo, kv_algo, tolerances_from)
    return VerifyResult(facts, tuple(inputs), figures, per_input, limits, sources,
                        tuple(check(figures, limits, trace, perplexity)), trace, perplexity)


def failure_summary(result: VerifyResult) -> str:
    """One paragraph naming every figure out of its limit, for the error a failed check raises."""
    lines = [f"  {f.message} ({result.tolerance_sources[f.limit_name]})" for f in result.failures]
    facts = result.checkpoint
    if "format" in facts:
        what = f"{facts['format']} checkpoint ({facts['quant_algo'] or 'unquantized'}" + (
            f", {facts['kv_cache_quant_algo']} KV cache)" if facts["kv_cache_quant_algo"] else ")")
        return (f"the {what} does not reproduce the source model's logits on {result.figures.tokens} "
                f"tokens of {len(result.inputs)} input(s):\n" + "\n".join(lines))
    return (f"the checkpoint ({facts['quant_algo'] or 'unquantized'}, tp_size {facts['tp_size']}, pp_size "
            f"{facts['pp_size']}) does not reproduce the source model's logits on {result.figures.tokens} "
            f"tokens of {len(result.inputs)} input(s):\n" + "\n".join(lines))
