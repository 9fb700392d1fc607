"""The local Hugging Face hub cache, found as huggingface_hub finds it, and what messages say of it:
the directory searched and the setting that chose it, every revision in full, the `hf download`
command that fetches what is missing (models and datasets alike; nothing here downloads)."""
from __future__ import annotations

import os
from pathlib import Path


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
