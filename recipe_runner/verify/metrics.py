"""The figures that compare checkpoint logits with the source model's, over every position of
every input sequence.

  max_abs_logit_error   max |l_src − l_ckpt| over positions and vocabulary
  mean_abs_logit_error  mean of the same
  mean_kl               mean over positions of KL(p_src ‖ p_ckpt), in nats
  top1_agreement        fraction of positions where both predict the same next token
  perplexity_*          exp(mean next-token NLL) of each model on the inputs themselves
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Figures:
    tokens: int
    max_abs_logit_error: float
    mean_abs_logit_error: float
    mean_kl: float
    top1_agreement: float
    perplexity_source: float | None  # None when no sequence has a next token to predict
    perplexity_checkpoint: float | None

    def to_dict(self) -> dict:
        return {k: round_figure(v) for k, v in asdict(self).items()}


def round_figure(value: float | int | None) -> float | int | None:
    """6 significant digits: readable, and stable across runs of the same computation."""
    if value is None or isinstance(value, int):
        return value
    return float(f"{value:.6g}")


def _perplexity(logits: list[torch.Tensor], sequences: list[list[int]]) -> float | None:
    nll, count = 0.0, 0
    for lg, seq in zip(logits, sequences):
        if len(seq) < 2:
            continue
        logp = torch.log_softmax(lg[:-1].to(torch.float64), dim=-1)
        nll -= logp.gather(1, torch.tensor(seq[1:]).unsqueeze(1)).sum().item()
        count += len(seq) - 1
    return math.exp(nll / count) if count else None


def compare(source: list[torch.Tensor], checkpoint: list[torch.Tensor], sequences: list[list[int]]) -> Figures:
    """Figures over all positions of `sequences` (logits as [len(seq), vocab] per sequence)."""
    a = torch.cat(source).to(torch.float64)
    b = torch.cat(checkpoint).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs()
    log_p, log_q = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).to(torch.float64)
    return Figures(
        tokens=a.shape[0],
        max_abs_logit_error=diff.max().item(),
        mean_abs_logit_error=diff.mean().item(),
        mean_kl=max(kl.mean().item(), 0.0),  # rounding can make a zero KL slightly negative
        top1_agreement=top1.mean().item(),
        perplexity_source=_perplexity(source, sequences),
        perplexity_checkpoint=_perplexity(checkpoint, sequences),
    )


@dataclass(frozen=True)
class PerplexityFigures:
    """Both models' perplexity on verify.perplexity's held-out windows."""

    windows: int
    tokens: int  # positions predicted: every window's length minus one
    perplexity_source: float
    perplexity_checkpoint: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_checkpoint / self.perplexity_source

    @property
    def recovery(self) -> float:
        """source / checkpoint perplexity: 1.0 when quantization costs nothing (llm-compressor's sense)."""
        return self.perplexity_source / self.perplexity_checkpoint

    def to_dict(self) -> dict:
        return {**{k: round_figure(v) for k, v in asdict(self).items()},
                "perplexity_ratio": round_figure(self.perplexity_ratio), "recovery": round_figure(self.recovery)}


def perplexity_figures(source: list[torch.Tensor], checkpoint: list[torch.Tensor],
                       sequences: list[list[int]]) -> PerplexityFigures | None:
    """Perplexities over `sequences` (None when none has a token to predict)."""
    ppl_source, ppl_checkpoint = _perplexity(source, sequences), _perplexity(checkpoint, sequences)
    if ppl_source is None or ppl_checkpoint is None:
        return None
    return PerplexityFigures(len(sequences), sum(len(s) - 1 for s in sequences), ppl_source, ppl_checkpoint)
