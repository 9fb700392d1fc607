"""Where a recipe's source model is on this machine (never downloaded)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recipe_runner.errors import Problem, RecipeError
from recipe_runner.recipe import Recipe


@dataclass(frozen=True)
class SourceLocation:
    description: str  # what the recipe asks for, for messages
    directory: Path | None  # the model directory here, or None when it is not available
    missing_reason: str = ""


def hf_hub_cache() -> Path:
    """The HF hub cache as the environment says now (huggingface_hub reads it only at import)."""
    return hub_cache_origin()[0]


def hub_cache_origin() -> tuple[Path, str]:
    """The HF hub cache and which setting chose it, resolved as huggingface_hub.constants does:
    HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, where HF_HOME defaults
    to $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface (`~` and `$VARS` expanded)."""
    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name]), f"${name}"
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub", "$HF_HOME/hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub", "$XDG_CACHE_HOME/huggingface/hub"
    return expand("~/.cache/huggingface/hub"), "the default; HF_HUB_CACHE and HF_HOME are unset"


def searched_cache() -> str:
    """The hub cache for messages: its path and the setting that chose it."""
    cache, origin = hub_cache_origin()
    return f"{cache} ({origin})"


def download_hint(repo_id: str, revision: str | None = None, *, dataset: bool = False) -> str:
    """The command that fetches a repo into the hub cache (huggingface_hub >= 0.34 installs `hf`)."""
    kind = " --repo-type dataset" if dataset else ""
    pinned = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{kind}{pinned}`"


def missing_snapshot(repo_dir: Path, revision: str | None) -> str:
    """Why `repo_dir` (models--org--name or datasets--org--name) holds no snapshot `revision`
    (None: the one refs/main names), every revision in full."""
    where = f"not in the local Hugging Face cache {searched_cache()}"
    if not repo_dir.is_dir():
        return f"{where}: no {repo_dir.name} there"
    snapshots = repo_dir / "snapshots"
    held = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    holds = f"it holds {', '.join(held)}" if held else "it holds no snapshot"
    wanted = f"no snapshot {revision}" if revision else "no refs/main naming a snapshot"
    return f"{where}: {repo_dir.name} has {wanted} ({holds})"


def locate_source(recipe: Recipe) -> SourceLocation:
    if recipe.has("source.path"):
        directory = recipe.resolve_path("source.path")
        if directory.is_dir():
            return SourceLocation(str(directory), directory)
        return SourceLocation(str(directory), None, f"directory {directory} does not exist")
    hub_id, revision = recipe.get("source.hub_id"), recipe.get("source.revision")
    description = f"{hub_id}@{revision}"  # in full: a typo in the last digit must be visible
    repo_dir = hf_hub_cache() / ("models--" + hub_id.replace("/", "--"))
    fetch = f"; fetch it once with {download_hint(hub_id, revision)}"
    if not (repo_dir / "snapshots" / revision).is_dir():
        return SourceLocation(description, None, missing_snapshot(repo_dir, revision) + fetch)
    try:
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(hub_id, revision=revision, local_files_only=True,
                                           cache_dir=hf_hub_cache()))
    except Exception as exc:  # a broken cache (LocalEntryNotFoundError, ...)
        return SourceLocation(description, None,
                              f"not usable from the local Hugging Face cache {searched_cache()} "
                              f"({type(exc).__name__}: {exc}){fetch}")
    return SourceLocation(description, directory)


def require_source(recipe: Recipe) -> Path:
    """The model directory, or a located recipe error saying why it is not usable."""
    source = locate_source(recipe)
    if source.directory is None:
        field = "source.path" if recipe.has("source.path") else "source.hub_id"
        raise RecipeError([Problem(recipe.location(field), field, f"source model {source.description}: {source.missing_reason}")])
    return source.directory
