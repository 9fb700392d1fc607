"""`recipe diff`: the semantic difference of two normalized recipes and the stages it invalidates."""
from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.pipeline.plan import recipe_stages
from recipe_runner.recipe import Recipe, load_recipe
from recipe_runner.recipe.model import canonical_json, thaw

MISSING = object()


@dataclass(frozen=True)
class FieldChange:
    path: str
    old: Any
    new: Any

    def describe(self) -> str:
        show = lambda v: "(unset)" if v is MISSING else canonical_json(v)  # noqa: E731
        return f"{self.path}: {show(self.old)} -> {show(self.new)}"


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def field_changes(old: Recipe, new: Recipe) -> list[FieldChange]:
    return field_changes_of(old.to_dict(), new.to_dict())


def invalidated_stages(old: Recipe, new: Recipe) -> tuple[list[tuple[str, str]], list[str]]:
    """([(stage, why)] that must rerun, [stages reused]) when going from `old` to `new`."""
    old_stages = {s.name: s for s in recipe_stages(old)}
    # Stage keys hash the source files, not where they are: a moved source may still be a cache hit.
    moved = [k for k in ("path", "hub_id", "revision") if old.get(f"source.{k}") != new.get(f"source.{k}")]
    rerun: dict[str, str] = {}
    kept: list[str] = []
    for stage in recipe_stages(new):
        previous = old_stages.get(stage.name)
        if previous is None:
            rerun[stage.name] = "new stage"
        elif moved and "source" in stage.inputs:
            rerun[stage.name] = (f"source.{moved[0]} changed (reused if the files there are identical)"
                                 + (f"; changed: {', '.join(c.path for c in field_changes_of(previous.params, stage.params))}"
                                    if previous.params != stage.params else ""))
        elif previous.params != stage.params:
            changed = [c.path for c in field_changes_of(previous.params, stage.params)]
            rerun[stage.name] = "changed: " + ", ".join(changed)
        elif previous.inputs != stage.inputs or any(i in rerun for i in stage.inputs):
            rerun[stage.name] = "input rebuilt: " + ", ".join(i for i in stage.inputs if i in rerun)
        else:
            kept.append(stage.name)
    for name in old_stages:
        if name not in rerun and name not in kept:
            rerun[name] = "removed from the plan"
    return list(rerun.items()), kept


def field_changes_of(old: Any, new: Any) -> list[FieldChange]:
    """Changed leaves between two nested mappings, by dotted path."""
    before, after = _leaves(thaw(old)), _leaves(thaw(new))
    return [FieldChange(p, before.get(p, MISSING), after.get(p, MISSING))
            for p in sorted(set(before) | set(after)) if before.get(p, MISSING) != after.get(p, MISSING)]


def format_diff(old_label: str, new_label: str, old: Recipe, new: Recipe, markdown: bool = False) -> str:
    changes = field_changes(old, new)
    rerun, kept = invalidated_stages(old, new)
    if markdown:
        lines = [f"### Recipe diff: `{old_label}` → `{new_label}`", ""]
        if changes:
            lines += ["| field | before | after |", "|---|---|---|"]
            lines += [f"| `{c.path}` | {_md(c.old)} | {_md(c.new)} |" for c in changes]
        else:
            lines.append("No semantic change.")
        lines += ["", "| stage | rebuild? | why |", "|---|---|---|"]
        lines += [f"| {name} | **yes** | {why} |" for name, why in rerun]
        lines += [f"| {name} | no (cached) | unchanged |" for name in kept]
        return "\n".join(lines)
    lines = [f"recipe diff {old_label} -> {new_label}"]
    lines += ["changed fields:"] + [f"  {c.describe()}" for c in changes] if changes else ["no semantic change"]
    if rerun:
        width = max(len(n) for n, _ in rerun)
        lines += ["stages to rebuild:"] + [f"  {name:<{width}}  {why}" for name, why in rerun]
    else:
        lines.append("stages to rebuild: none")
    lines.append("stages reused: " + (", ".join(kept) if kept else "none"))
    return "\n".join(lines)


def _md(value: Any) -> str:
    return "_unset_" if value is MISSING else f"`{canonical_json(value)}`"


def load_recipe_at_revision(rev: str, file: Path, variables: dict | None = None) -> Recipe:
    """The recipe `file` as committed at git revision `rev` (its bases at that revision too)."""
    file = file.resolve()
    top = _git(file.parent, "rev-parse", "--show-toplevel").strip()
    relative = file.relative_to(Path(top).resolve())
    commit = _commit(top, rev)
    archive = subprocess.run(["git", "-C", top, "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        raise UserError(f"git archive {rev} failed in {top}: {archive.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory(prefix="recipe-diff-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        if not (Path(tmp) / relative).is_file():
            raise UserError(f"{relative} does not exist at revision {rev}")
        return load_recipe(Path(tmp) / relative, variables)


def _commit(top: str, rev: str) -> str:
    """The commit sha `rev` names. Anything else is refused before git sees it as an argument:
    `--rev=--output=FILE` would otherwise be an option of `git archive` and overwrite FILE."""
    if not rev or rev.startswith("-") or "\0" in rev:
        raise UserError(f"--rev {rev!r} is not a git revision; give a commit, branch or tag (e.g. --rev HEAD~1)")
    proc = subprocess.run(["git", "-C", top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"--rev {rev!r} names no commit in {top}; give a commit, branch or tag (e.g. --rev HEAD~1)")
    return proc.stdout.strip()


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout
