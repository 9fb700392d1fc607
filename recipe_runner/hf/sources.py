"""Where a recipe's source model is on this machine (never downloaded)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recipe_runner.errors import Problem, RecipeError
from recipe_runner.hf.hub_cache import download_hint, hf_hub_cache, missing_snapshot, searched_cache
from recipe_runner.recipe import Recipe


@dataclass(frozen=True)
class SourceLocation:
    description: str  # what the recipe asks for, for messages
    directory: Path | None  # the model directory here, or None when it is not available
    missing_reason: str = ""


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
        from huggingface_hub import snapshot_download  # huggingface_hub: kept off the warm path of local sources

        directory = Path(snapshot_download(hub_id, revision=revision, local_files_only=True,
                                           cache_dir=hf_hub_cache()))
    except Exception as exc:  # a broken cache (LocalEntryNotFoundError, ...)
        return SourceLocation(description, None,
                              f"not usable from the local Hugging Face cache {searched_cache()} "
                              f"({type(exc).__name__}: {exc}){fetch}")
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
