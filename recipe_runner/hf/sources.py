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
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def locate_source(recipe: Recipe) -> SourceLocation:
    if recipe.has("source.path"):
        directory = recipe.resolve_path("source.path")
        if directory.is_dir():
            return SourceLocation(str(directory), directory)
        return SourceLocation(str(directory), None, f"directory {directory} does not exist")
    hub_id, revision = recipe.get("source.hub_id"), recipe.get("source.revision")
    description = f"{hub_id}@{revision[:12]}"
    try:
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(hub_id, revision=revision, local_files_only=True,
                                           cache_dir=hf_hub_cache()))
    except Exception as exc:  # not cached (LocalEntryNotFoundError) or a broken cache
        return SourceLocation(description, None,
                              f"not in the local Hugging Face cache ({type(exc).__name__}); fetch it once with "
                              f"`huggingface-cli download {hub_id} --revision {revision}`")
    return SourceLocation(description, directory)


def source_field(recipe: Recipe) -> str:
    """The recipe field that names the source model (where its problems are located)."""
    return "source.path" if recipe.has("source.path") else "source.hub_id"


def source_problem(recipe: Recipe, source: SourceLocation) -> Problem | None:
    """Why the located source cannot be built from (no directory, or no config.json), or None."""
    field = source_field(recipe)
    if source.directory is None:
        return Problem(recipe.location(field), field, f"source model {source.description}: {source.missing_reason}")
    if not (source.directory / "config.json").is_file():
        return Problem(recipe.location(field), field, f"source model {source.description}: no config.json in "
                                                      f"{source.directory}; point to a Hugging Face model directory")
    return None


def require_source(recipe: Recipe) -> Path:
    """The model directory, or a located recipe error saying why it is not usable."""
    source = locate_source(recipe)
    if source.directory is None:
        raise RecipeError([source_problem(recipe, source)])
    return source.directory
