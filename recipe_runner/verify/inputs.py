"""The token sequences verify runs: prompts tokenized with the source model's own tokenizer (local
files only), and literal token-id lists. Each sequence runs on its own (batch 1, no padding)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from recipe_runner.errors import UserError
from recipe_runner.hf.files import tokenizer_problem


@dataclass(frozen=True)
class VerifyInput:
    label: str  # "prompt 1", "token_ids 2"
    token_ids: tuple[int, ...]
    text: str | None = None  # the prompt, when the input is text

    def to_dict(self) -> dict:
        out: dict = {"label": self.label, "tokens": len(self.token_ids)}
        if self.text is not None:
            out["prompt"] = self.text
        out["token_ids"] = list(self.token_ids)
        return out


def parse_token_ids(text: str) -> list[int]:
    """"1, 2,3" → [1, 2, 3] (the CLI's --token-ids)."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"--token-ids {text!r}: expected comma-separated non-negative integers, e.g. \"1,2,3\"") from None
    if not ids or min(ids) < 0:
        raise UserError(f"--token-ids {text!r}: expected comma-separated non-negative integers, e.g. \"1,2,3\"")
    return ids


def require_tokenizer(source_dir: Path, what: str = "verify prompts are") -> None:
    """UserError unless `source_dir` has tokenizer files for text prompts (a file check, nothing loaded)."""
    if tokenizer_problem(source_dir):
        raise UserError(f"{what} tokenized with the source model's tokenizer, but {source_dir} has none "
                        "(tokenizer.json, tokenizer.model or vocab.json); copy the tokenizer files there or give "
                        "token ids instead (verify.token_ids / --token-ids)")


def _tokenize(source_dir: Path, prompts: Sequence[str], trust_remote_code: bool) -> list[list[int]]:
    require_tokenizer(source_dir)
    from recipe_runner.calibration.tokens import load_tokenizer  # transformers: after the file check

    tokenizer = load_tokenizer(source_dir, trust_remote_code=trust_remote_code)
    return [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]


def prepare_inputs(source_dir: Path, prompts: Sequence[str], token_ids: Sequence[Sequence[int]],
                   vocab_size: int, *, trust_remote_code: bool = False) -> list[VerifyInput]:
    """Prompts first, then token-id lists; every id must be inside the vocabulary."""
    if not prompts and not token_ids:
        raise UserError("verify needs inputs: give prompts (verify.prompts / --prompt) or token ids "
                        "(verify.token_ids / --token-ids)")
    inputs = [VerifyInput(f"prompt {i}", tuple(ids), text)
              for i, (text, ids) in enumerate(zip(prompts, _tokenize(source_dir, prompts, trust_remote_code) if prompts else []), 1)]
    inputs += [VerifyInput(f"token_ids {i}", tuple(ids)) for i, ids in enumerate(token_ids, 1)]
    for item in inputs:
        if not item.token_ids:
            raise UserError(f"{item.label} ({item.text!r}) tokenizes to no tokens; use a longer prompt")
        bad = [t for t in item.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{item.label}: token id {bad[0]} is outside the vocabulary (vocab_size {vocab_size})")
    return inputs
