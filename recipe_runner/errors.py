"""Errors that reach the user.

Every error a user can fix (bad recipe, missing model file, unknown option) is a
`UserError`: the CLI prints its message, without a traceback, and exits with
`exit_code` (2). Failures of a tool we run (e.g. trtllm-build) are `StageFailed`
(exit 1). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Location:
    """A place in a file; line and column are 1-based, None when unknown."""

    file: str
    line: int | None = None
    col: int | None = None

    def sort_key(self) -> tuple:
        """Order by file, then line, then column (unknown positions first)."""
        return self.file, self.line or 0, self.col or 0

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        if self.col is None:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.col}"


class RecipeRunnerError(Exception):
    """Base class of the errors the CLI reports without a traceback."""

    exit_code = 2


class UserError(RecipeRunnerError):
    """A problem the user can fix; the message says where, why and what to do."""


@dataclass(frozen=True)
class Problem:
    """One finding about a recipe: where it is, which field, what is wrong."""

    location: Location
    path: str  # dotted recipe path, e.g. "quantization.algo"; "" for the whole document
    message: str
    text: str | None = field(default=None, compare=False)  # the line as an error's own check worded it

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        where = f"{self.path}: " if self.path else ""
        return f"{self.location}: {where}{self.message}"

    def to_dict(self) -> dict:
        """The machine-readable form (`--format json`): file, line, column, field, message."""
        loc = self.location
        return {"file": loc.file, "line": loc.line, "column": loc.col, "field": self.path, "message": self.message}


class RecipeError(UserError):
    """A recipe is invalid; carries every problem found, not just the first, sorted by position."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: p.location.sort_key())
        super().__init__("\n".join(str(p) for p in self.problems))


class SourceModelError(UserError):
    """The source model directory is missing files, truncated or unsupported."""


class StageFailed(RecipeRunnerError):
    """A stage's tool failed at run time (not a user-input problem). `field`: the recipe field whose
    location the build adds to the message (a stage sees no recipe, only its params)."""

    exit_code = 1

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
