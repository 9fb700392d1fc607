"""Many plans as one DAG: identical stages (equal keys) run once, on an executor.

The driver (this module) keys every stage of every plan before anything runs, merges stages
with equal keys into one job, starts jobs whose inputs are built as the executor's capacity
and the memory budget allow, and publishes each plan whose stages all succeeded. Executors:
inline (in this process, one job at a time), a local process pool, or Ray.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from recipe_runner.pipeline.execute import (BuildResult, Echo, check_lock_inputs, execute_stage, finish,
                                           for_installed_release, prepare)
from recipe_runner.hf.config import read_model_config
from recipe_runner.recipe import load_recipes
from recipe_runner.store.cache import CacheStore
from recipe_runner.store.entry import Entry
from recipe_runner.errors import RecipeRunnerError, UserError
from recipe_runner.store.lock import LockFile
from recipe_runner.pipeline.plan import Plan, make_plan
from recipe_runner.pipeline.progress import Progress
from recipe_runner.pipeline.resolve import ResolvedPlan, resolve
from recipe_runner.devices import parse_device
from recipe_runner.stages.registry import DEVICE_STAGES, STAGES
from recipe_runner.trtllm.mapping import ParallelMapping
from recipe_runner.trtllm.toolchain import require_toolchain



@dataclass
class Job:
    key: str
    stage: str
    users: list[int]  # indices of the plans that need this stage; the first one runs it
    deps: tuple[str, ...]  # keys of the jobs whose entries it reads
    state: str = "pending"  # pending, running, done, failed, skipped, not started
    record: dict | None = None
    error: BaseException | str | None = None
    exit_code: int = 0


@dataclass
class BuildReport:
    plans: list[ResolvedPlan]
    jobs: dict[str, Job]
    results: dict[int, BuildResult] = field(default_factory=dict)
    failures: dict[int, tuple[int, BaseException | str]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return max((code for code, _ in self.failures.values()), default=0)

    def trace(self) -> list[dict]:
        """Every job once: stage, key, action (ran/cached/failed/...), and which recipes used it."""
        return [{**(job.record or {"stage": job.stage, "key": job.key, "action": job.state}),
                 "recipes": [self.plans[i].plan.recipe.name for i in job.users]} for job in self.jobs.values()]

    def whose(self, job: Job) -> str:
        """The recipes (matrix variants) a job is for, when the build has several; else ""."""
        if len(self.plans) == 1:
            return ""
        return ", ".join(self.plans[u].plan.recipe.name for u in job.users)

    def raise_first_failure(self) -> None:
        if not self.failures:
            return
        code, error = self.failures[min(self.failures)]
        if isinstance(error, BaseException):
            raise error
        raise BuildFailed(error, code)


class BuildFailed(RecipeRunnerError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---- executors ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageTask:
    """Everything a worker process (or Ray task) needs to rebuild the driver's view of one stage."""

    recipe_path: str
    variables: dict
    variant: int | None
    cwd: str
    cache_root: str
    stage: str
    key: str
    workers: int
    whose: str = ""  # the recipes it is for, in log lines of builds of several recipes
    device: str = "cpu"  # the --device spec the plan was made with (recipe_runner/devices.py)


def _worker_echo(line: str) -> None:
    # A worker's lines reach the terminal beside the driver's live display, not through it: clear
    # the display's line first (it is redrawn below at its next refresh).
    print(("\r\033[K" if sys.stdout.isatty() else "") + line, flush=True)


def run_stage_task(task: StageTask) -> dict:
    """Worker side: reload the recipe, check the key is the driver's, build the stage's entry.
    Errors come back as data (exception objects with custom constructors do not pickle)."""
    try:
        os.chdir(task.cwd)
        recipe = load_recipes(task.recipe_path, task.variables)[task.variant or 0]
        store = CacheStore(task.cache_root)
        toolchain = require_toolchain() if task.stage == "build-engine" else None
        plan = make_plan(recipe, device=parse_device(task.device))
        plan = for_installed_release(plan, toolchain) if toolchain else plan
        resolved = resolve(plan, store, toolchain=toolchain)
        if resolved.status(task.stage).key.digest != task.key:
            raise UserError(f"{task.stage}: its inputs changed while the build ran (a source file or recipe was "
                            "edited); run the build again")
        inputs = resolved.status(task.stage).stage.inputs
        entries = {s.stage.name: store.get(s.key.digest) for s in resolved.statuses if s.stage.name in inputs}
        record = execute_stage(resolved, task.stage, entries, store, task.workers, _worker_echo, task.whose)
        return {"ok": True, "record": record}
    except RecipeRunnerError as exc:
        return {"ok": False, "exit_code": exc.exit_code, "error": str(exc)}
    except Exception:  # a bug: keep the traceback for the report
        return {"ok": False, "exit_code": 1, "error": traceback.format_exc()}


class InlineExecutor:
    """Runs each job in this process as it starts (one at a time); keeps original exceptions."""

    capacity = 1

    def __init__(self, echo: Echo):
        self.echo = echo

    def start(self, resolved: ResolvedPlan, stage: str, entries: dict[str, Entry], store: CacheStore,
              workers: int, task: StageTask) -> Future:
        future: Future = Future()
        try:
            record = execute_stage(resolved, stage, entries, store, workers, self.echo, task.whose)
            future.set_result({"ok": True, "record": record})
        except RecipeRunnerError as exc:
            future.set_result({"ok": False, "exit_code": exc.exit_code, "error": exc})
        return future

    def close(self) -> None:
        pass


class ProcessExecutor:
    """A local pool of `jobs` worker processes (spawned: torch does not survive fork reliably)."""

    def __init__(self, jobs: int):
        self.capacity = jobs
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def start(self, resolved, stage, entries, store, workers, task: StageTask) -> Future:
        return self.pool.submit(run_stage_task, task)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class RayExecutor:
    """Stages as Ray tasks. The cache directory must be on a filesystem every node mounts at the
    same path; the driver publishes outputs and lock files."""

    def __init__(self, address: str, capacity: int):
        try:
            import ray  # optional: the [ray] extra
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'recipe-runner[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True,
                     log_to_driver=True)
        self.ray = ray
        self.capacity = capacity
        self.remote = ray.remote(run_stage_task)

    def start(self, resolved, stage, entries, store, workers, task: StageTask) -> Future:
        gpus = ray_gpus(resolved, stage)
        if not gpus:
            return self.remote.remote(task).future()
        # Ray shows the task only the GPUs it was given (CUDA_VISIBLE_DEVICES): there they are cuda:0..n-1
        task = dataclasses.replace(task, device=",".join(f"cuda:{i}" for i in range(gpus)))
        return self.remote.options(num_gpus=gpus).remote(task).future()

    def close(self) -> None:
        pass


def ray_gpus(resolved: ResolvedPlan, stage: str) -> int:
    """The GPUs a Ray task of `stage` asks for: one per device of a CUDA plan's computing stage, else 0."""
    device = resolved.plan.device
    return len(device.names) if device.is_cuda and stage in DEVICE_STAGES else 0


# ---- the driver --------------------------------------------------------------------------------

def estimate_memory(resolved: ResolvedPlan, stage: str, workers: int) -> int:
    """A stage's peak memory, roughly, from the model's shapes (for the --max-memory budget)."""
    return STAGES[stage].memory(read_model_config(resolved.source_dir), workers)


def expected_bytes(resolved: ResolvedPlan, stage: str) -> int | None:
    """Roughly what the shard stage writes (for an ETA): the source weights in the checkpoint
    dtype, plus the embedding copies of TP ranks when it is not split."""
    if stage != "shard":
        return None
    model = read_model_config(resolved.source_dir)
    item = {"float32": 4}.get(resolved.status("convert").stage.params["dtype"], 2)
    mapping = ParallelMapping.from_recipe(resolved.status("shard").stage.params)
    embedding_copies = 0 if mapping.use_parallel_embedding else mapping.tp_size - 1
    params = sum(d.size for n, d in resolved.sources.items() if not n.endswith(".json")) // 2
    return (params + embedding_copies * model.vocab_size * model.hidden_size) * item


def build_graph(resolved: list[ResolvedPlan]) -> dict[str, Job]:
    """One job per distinct stage key, in an order where inputs come first."""
    jobs: dict[str, Job] = {}
    for index, plan in enumerate(resolved):
        keys = {s.stage.name: s.key.digest for s in plan.statuses}
        for status in plan.statuses:
            key = status.key.digest
            if key in jobs:
                jobs[key].users.append(index)
            else:
                deps = tuple(keys[i] for i in (*status.stage.inputs, *status.stage.after) if i in keys)
                jobs[key] = Job(key, status.stage.name, [index], deps)
    return jobs


def run_builds(plans: list[Plan], *, store: CacheStore, executor, workers: int | None = None,
               rehash: bool = False, locked: dict[int, LockFile] | None = None, fail_fast: bool = False,
               max_memory: int | None = None, force: bool = False, verbose: bool = False,
               echo: Echo = print) -> BuildReport:
    """Build every plan, sharing equal stages; a failing stage stops only the plans that need it
    (all of them with fail_fast). Each successful plan is published with its lock file.
    Every output directory is checked before any stage runs (`force`: see publish.OutputDir);
    `verbose` first prints every stage's full key and why it runs."""
    try:
        resolved = prepare(plans, store, rehash=rehash, force=force, echo=echo)
        for plan, status in ((p, s) for p in resolved for s in p.statuses) if verbose else ():
            why = "cached" if status.cached else f"must run: {'; '.join(status.reasons)}"
            echo(f"[{status.stage.name}] {plan.plan.recipe.name} key {status.key.digest}: {why}")
        for index, lock in (locked or {}).items():
            check_lock_inputs(resolved[index], lock)
        keys = {s.key.digest for plan in resolved for s in plan.statuses}
        # The lease keeps gc off every entry this build reads and off its scratch store.
        with store.lease(keys, scratch=bool(locked)) as lease:
            run_store = lease.scratch or store  # a locked rebuild trusts no cache entry
            report = BuildReport(resolved, build_graph(resolved))
            entries: list[dict[str, Entry]] = [{} for _ in resolved]
            with Progress(run_store.root) as progress:
                _drive(report, entries, run_store, executor, workers, fail_fast, max_memory, echo, progress)
            _publish_all(report, entries, store, locked or {}, force, echo)
            return report
    finally:
        executor.close()


def _workers(plan: ResolvedPlan, workers: int | None) -> int:
    return workers or plan.plan.recipe.data["workers"]


def _task(report: BuildReport, job: Job, store: CacheStore, workers: int) -> StageTask:
    recipe = report.plans[job.users[0]].plan.recipe
    return StageTask(str(recipe.path), dict(recipe.variables), recipe.variant, os.getcwd(), str(store.root),
                     job.stage, job.key, workers, report.whose(job), report.plans[job.users[0]].plan.device.spec)


def _drive(report: BuildReport, entries: list[dict[str, Entry]], store: CacheStore, executor, workers: int | None,
           fail_fast: bool, max_memory: int | None, echo: Echo, progress: Progress) -> None:
    jobs = report.jobs
    running: dict[Future, tuple[Job, int]] = {}
    stopped = False
    while True:
        for job in jobs.values():
            if job.state == "pending" and any(jobs[d].state in ("failed", "skipped") for d in job.deps):
                job.state, job.error = "skipped", "not run: an input stage failed"
        ready = [j for j in jobs.values() if j.state == "pending" and all(jobs[d].state == "done" for d in j.deps)]
        for job in ready if not stopped else []:
            if len(running) >= executor.capacity:
                break
            owner = report.plans[job.users[0]]
            n = _workers(owner, workers)
            need = estimate_memory(owner, job.stage, n) if max_memory else 0
            in_use = sum(m for _, m in running.values())
            if running and max_memory and in_use + need > max_memory:
                continue  # wait for memory; a job always runs when nothing else does
            job.state = "running"
            task = _task(report, job, store, n)
            progress.track(job.key, job.stage, expected_bytes(owner, job.stage) if progress.enabled else None,
                           label=f"{job.stage} {task.whose}".strip())
            future = executor.start(owner, job.stage, entries[job.users[0]], store, n, task)
            running[future] = (job, need)
        if not running:
            break
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in done:
            job, _ = running.pop(future)
            progress.untrack(job.key)
            result = future.result()
            if result["ok"]:
                job.state, job.record = "done", result["record"]
                entry = store.get(job.key)
                for user in job.users:
                    entries[user][job.stage] = entry
            else:
                job.state, job.error, job.exit_code = "failed", result["error"], result["exit_code"]
                echo(f"[{job.stage}] FAILED ({job.key[:12]}) for {', '.join(report.plans[u].plan.recipe.name for u in job.users)}")
                stopped = stopped or fail_fast
    for job in jobs.values():
        if job.state == "pending":
            job.state = "not started"


def _publish_all(report: BuildReport, entries: list[dict[str, Entry]], store: CacheStore,
                 locked: dict[int, LockFile], force: bool, echo: Echo) -> None:
    for index, plan in enumerate(report.plans):
        mine = [report.jobs[s.key.digest] for s in plan.statuses]
        failed = next((j for j in mine if j.state == "failed"), None)
        blocked = next((j for j in mine if j.state != "done"), None)
        if failed is not None:
            report.failures[index] = (failed.exit_code, failed.error)
            continue
        if blocked is not None:
            report.failures[index] = (1, f"{blocked.stage}: {blocked.error or blocked.state} (another recipe's stage failed)")
            continue
        trace = [report.jobs[s.key.digest].record for s in plan.statuses]
        try:
            report.results[index] = finish(plan, entries[index], store, locked.get(index), trace, force, echo)
        except RecipeRunnerError as exc:
            report.failures[index] = (exc.exit_code, exc)


def make_executor(kind: str, jobs: int, address: str, echo: Echo):
    if kind == "ray":
        return RayExecutor(address, capacity=max(jobs, 1))
    if kind != "local":
        raise UserError(f"--executor {kind}: choose local or ray")
    return InlineExecutor(echo) if jobs == 1 else ProcessExecutor(jobs)
