"""`recipe cache ...`: inspect and maintain the content-addressed cache (part of the `recipe` command)."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import typer

from recipe_runner.errors import UserError
from recipe_runner.pipeline.progress import format_size
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.gc import parse_size

CACHE_HELP = "Cache directory (default: $RECIPE_CACHE_DIR or ~/.cache/recipe-runner)."


def _store(cache_dir: Optional[Path]):
    return CacheStore(cache_dir, warn=lambda message: typer.echo(f"warning: {message}", err=True))


cache_app = typer.Typer(help="Inspect and maintain the content-addressed cache.", no_args_is_help=True)


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP)) -> None:
    """List cache entries, least recently used first."""
    store = _store(cache_dir)
    entries = store.ls()
    for info in entries:
        used = datetime.datetime.fromtimestamp(info.last_used).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{info.key[:12]}  {info.stage:<12} {format_size(info.size):>9}  used {used}  {', '.join(info.recipes)}")
    typer.echo(f"{len(entries)} entries, {format_size(sum(i.size for i in entries))} in {store.root}")


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP)) -> None:
    """Rehash every entry; corrupt entries are quarantined (never reused) and listed. Exit 1 if any."""
    problems = _store(cache_dir).verify()
    for key, problem in problems:
        typer.echo(f"CORRUPT {key[:12]}: {problem} (quarantined)", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo("every cache entry matches its manifest")


@cache_app.command("gc")
def cache_gc(
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Remove least recently used entries until the cache is at most this size (e.g. 500G)."),
    older_than: Optional[float] = typer.Option(None, "--older-than", help="Remove entries not used for this many days (>= 0)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Remove cache entries by size (LRU) and/or age, and stale temporary directories. Entries a
    running build uses, and its temporary directories, are never removed."""
    if max_size is None and older_than is None:
        raise UserError("give --max-size SIZE and/or --older-than DAYS")
    removed = _store(cache_dir).gc(parse_size(max_size) if max_size else None, older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for info in removed:
        typer.echo(f"{verb} {info.key[:12]}  {info.stage:<12} {format_size(info.size):>9}  {', '.join(info.recipes)}")
    typer.echo(f"{verb} {len(removed)} entries, {format_size(sum(i.size for i in removed))}")
