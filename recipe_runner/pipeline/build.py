"""Build one plan: run each stage whose key is not cached, publish, write the lock file (the
scheduler's single-plan case; several plans at once: scheduler.run_builds)."""
from __future__ import annotations

from recipe_runner.pipeline.execute import BuildResult, Echo
from recipe_runner.pipeline.plan import Plan
from recipe_runner.pipeline.scheduler import InlineExecutor, run_builds
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.lock import LockFile


def run_build(plan: Plan, *, store: CacheStore, workers: int | None = None, rehash: bool = False,
              locked: LockFile | None = None, force: bool = False, echo: Echo = print) -> BuildResult:
    """Run every stage of `plan` that is not cached, publish the outputs and the lock file.

    With `locked`, every stage runs again in a scratch store (the cache is not trusted) and the
    build fails unless the outputs are bit-identical to the lock's.
    """
    report = run_builds([plan], store=store, executor=InlineExecutor(echo), workers=workers, rehash=rehash,
                        locked={0: locked} if locked is not None else None, force=force, echo=echo)
    report.raise_first_failure()
    return report.results[0]
