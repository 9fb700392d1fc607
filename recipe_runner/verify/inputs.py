"""The token sequences verify runs: prompts tokenized with the source model's own tokenizer (local
files only), and literal token-id lists. Each sequence runs on its own (batch 1, no padding)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from recipe_runner.calibration.dataset import PERPLEXITY, locate_dataset, read_texts
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
                   vocab_size: int, *, trust_remote_code: bool = False,
                   more: Sequence[VerifyInput] = ()) -> list[VerifyInput]:
    """Prompts first, then token-id lists; every id, also of the `more` inputs that will follow them
    (perplexity windows), must be inside the vocabulary."""
    if not prompts and not token_ids and not more:
        raise UserError("verify needs inputs: give prompts (verify.prompts / --prompt) or token ids "
                        "(verify.token_ids / --token-ids)")
    inputs = [VerifyInput(f"prompt {i}", tuple(ids), text)
              for i, (text, ids) in enumerate(zip(prompts, _tokenize(source_dir, prompts, trust_remote_code) if prompts else []), 1)]
    inputs += [VerifyInput(f"token_ids {i}", tuple(ids)) for i, ids in enumerate(token_ids, 1)]
    for item in [*inputs, *more]:
        if not item.token_ids:
            raise UserError(f"{item.label} ({item.text!r}) tokenizes to no tokens; use a longer prompt")
        bad = [t for t in item.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{item.label}: token id {bad[0]} is outside the vocabulary (vocab_size {vocab_size})")
    return inputs


@dataclass(frozen=True)
class PerplexityText:
    """verify.perplexity's dataset, as the stage reads it (its files come from the key's verify-data input)."""

    dataset: str
    path: Path | None  # the dataset resolved against the recipe that set it
    text_field: str = "text"
    split: str = "test"
    revision: str | None = None
    num_tokens: int = 2048
    seq_len: int = 512


def perplexity_windows(source_dir: Path, text: PerplexityText, *, trust_remote_code: bool = False) -> list[VerifyInput]:
    """The dataset's texts joined by blank lines, tokenized with the source's tokenizer, its first
    `num_tokens` tokens cut into consecutive windows of `seq_len` (a last window under 2 tokens,
    which predicts nothing, is dropped)."""
    require_tokenizer(source_dir, "verify.perplexity's dataset is")
    from recipe_runner.calibration.tokens import load_tokenizer  # transformers: after the file check

    files = locate_dataset(text.dataset, text.path, text.split, text.revision, PERPLEXITY)
    texts = read_texts(files, text.text_field, PERPLEXITY)
    tokenizer = load_tokenizer(source_dir, trust_remote_code=trust_remote_code)
    ids = _first_tokens(tokenizer, texts, text.num_tokens)
    windows = [ids[i:i + text.seq_len] for i in range(0, len(ids), text.seq_len)]
    return [VerifyInput(f"perplexity {i}", tuple(w)) for i, w in enumerate(windows, 1) if len(w) >= 2]


def _first_tokens(tokenizer, texts: list[str], num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of the joined texts, tokenizing only as much text as needed: a
    character budget of 8 per token, doubled until it gives enough tokens or covers every text."""
    budget = 8 * num_tokens
    while True:
        chosen, used = [], 0
        for t in texts:
            if used >= budget:
                break
            chosen.append(t)
            used += len(t) + 2
        ids = list(tokenizer("\n\n".join(chosen))["input_ids"])
        if len(ids) >= num_tokens or len(chosen) == len(texts):
            return ids[:num_tokens]
        budget *= 2
