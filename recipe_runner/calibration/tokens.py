"""Tokenizing calibration texts with the source model's own tokenizer (local files only) into
right-padded batches with a validity mask.

Right padding needs no attention mask: attention is causal, so a real token never attends to the
padding after it; padded positions are left out of every statistic through `Batch.mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from recipe_runner.errors import UserError
from recipe_runner.hf.files import tokenizer_problem
from recipe_runner.hf.remote_code import refuse_remote_code


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    """The source's tokenizer; its own code (auto_map) runs only with `trust_remote_code` (the recipe's
    source.trust_remote_code). Passed explicitly: left None, transformers asks on stdin."""
    problem = tokenizer_problem(model_dir)
    if problem:
        raise UserError(problem)
    refuse_remote_code(model_dir, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise UserError(f"{model_dir}: the tokenizer files cannot be loaded ({type(e).__name__}: {e}); fetch "
                        "them again") from None


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # int64 [B, T], right-padded
    mask: torch.Tensor  # bool [B, T]: True on real tokens

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def tokenize(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated to `max_seq_len`; texts that give no tokens are dropped."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"]
        if ids:
            out.append(list(ids))
    return out


def make_batches(sequences: list[list[int]], batch_size: int, vocab_size: int) -> list[Batch]:
    """Consecutive groups of `batch_size` sequences, each right-padded to its longest member."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start:start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.zeros((len(group), width), dtype=torch.int64)
        mask = torch.zeros((len(group), width), dtype=torch.bool)
        for row, seq in enumerate(group):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, :len(seq)] = True
        if int(ids.max()) >= vocab_size:
            raise UserError(f"the tokenizer produced token id {int(ids.max())}, but the model's vocab_size is "
                            f"{vocab_size}: the tokenizer in the source directory does not belong to this model")
        batches.append(Batch(ids, mask))
    return batches
