"""Matrix recipes and many-recipe builds: one DAG, shared stages once, executors, failures."""
from __future__ import annotations

import json
import re
from pathlib import Path


from recipe_runner.store.cache import CacheStore
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipes
from recipe_runner.pipeline.scheduler import InlineExecutor, ProcessExecutor, run_builds
from tests.fake_trtllm import install_fake_toolchain
from tests.recipe_files import run_cli, write

MATRIX = """\
recipe_version: 1
name: tiny
source: {{path: {model}}}
matrix:
  mapping.tp_size: [1, 2]
  mapping.use_parallel_embedding: [false, true]
{extra}"""


def matrix_recipe(tmp_path: Path, model: Path, extra: str = "", out: str | None = None) -> Path:
    text = MATRIX.format(model=model, extra=extra)
    if out:
        text += f"output: {{dir: {out}}}\n"
    return write(tmp_path, "m.yaml", text)


def test_matrix_expands_in_order_with_located_values(tiny_model, tmp_path):
    recipes = load_recipes(matrix_recipe(tmp_path, tiny_model("gqa"), out="dist"))
    assert [r.name for r in recipes] == ["tiny-tp1-use_parallel_embedding-false", "tiny-tp1-use_parallel_embedding-true",
                                         "tiny-tp2-use_parallel_embedding-false", "tiny-tp2-use_parallel_embedding-true"]
    assert [(r.get("mapping.tp_size"), r.get("mapping.use_parallel_embedding")) for r in recipes] == [
        (1, False), (1, True), (2, False), (2, True)]
    assert str(recipes[2].location("mapping.tp_size")).endswith("m.yaml:5:24")
    assert recipes[3].get("output.dir") == "dist/tiny-tp2-use_parallel_embedding-true"
    assert "matrix" not in recipes[0].data and recipes[1].variant == 1


def test_bad_matrix_is_located(tmp_path, capsys):
    path = write(tmp_path, "m.yaml", "recipe_version: 1\nname: t\nsource: {path: x}\nmatrix:\n"
                                     "  mapping.tp_szie: [1, 2]\n  quantization.algo: [none, int9]\n")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    assert "m.yaml:5:3: matrix.mapping.tp_szie: 'mapping.tp_szie' is not a recipe field that can vary " \
           "(did you mean 'mapping.tp_size'?)" in err
    path.write_text(path.read_text().replace("tp_szie", "tp_size"))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and "m.yaml:6:29: quantization.algo: 'int9' is not one of" in err


def test_a_matrix_variant_the_model_refuses_points_at_its_value(tiny_model, tmp_path, capsys):
    path = write(tmp_path, "m.yaml", f"recipe_version: 1\nname: t\nsource: {{path: {tiny_model('gqa')}}}\n"
                                     "matrix:\n  mapping.tp_size: [2, 3]\n")
    code, _, err = run_cli(capsys, "plan", str(path))
    assert code == 2 and "m.yaml:5:24: mapping.tp_size: tp_size=3 does not divide num_attention_heads=8" in err


def test_2x2_matrix_converts_once_and_plan_shows_the_shared_stage(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = matrix_recipe(tmp_path, tiny_model("gqa"))
    code, out, err = run_cli(capsys, "plan", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert "stages shared between these recipes (each built once):" in out
    assert "convert" in out.split("each built once):")[1] and "used by tiny-tp1-use_parallel_embedding-false, " in out
    plans = [make_plan(r) for r in load_recipes(path)]
    report = run_builds(plans, store=CacheStore(tmp_path / "cache"), executor=InlineExecutor(lambda _: None),
                        echo=lambda _: None)
    trace = report.trace()
    assert [(t["stage"], t["action"], len(t["recipes"])) for t in trace if t["stage"] == "convert"] == [("convert", "ran", 4)]
    shards = [t for t in trace if t["stage"] == "shard"]
    # tp1 with and without parallel embedding write the same bytes but are different recipes: 4 shard keys
    assert len(shards) == 4 and all(t["action"] == "ran" for t in shards)
    assert sorted(report.results) == [0, 1, 2, 3]
    assert all((tmp_path / "build" / r.plan.recipe.name / "recipe.lock").is_file() for r in report.plans)


def _outputs(report) -> list[dict]:
    return [json.loads(report.results[i].lock_path.read_text())["outputs"] for i in sorted(report.results)]


def test_jobs_2_gives_the_same_bytes_as_jobs_1(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("gqa")
    one = run_builds([make_plan(r) for r in load_recipes(matrix_recipe(tmp_path, model, out="one"))],
                     store=CacheStore(tmp_path / "c1"), executor=InlineExecutor(lambda _: None), echo=lambda _: None)
    two = run_builds([make_plan(r) for r in load_recipes(matrix_recipe(tmp_path, model, out="two"))],
                     store=CacheStore(tmp_path / "c2"), executor=ProcessExecutor(2), echo=lambda _: None)
    assert not two.failures and _outputs(one) == _outputs(two)
    assert [t["action"] for t in two.trace()].count("ran") == 5  # 1 convert + 4 shards


def test_one_failing_variant_leaves_the_others_built(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    install_fake_toolchain(tmp_path / "fake", monkeypatch)
    monkeypatch.setenv("FAKE_TRTLLM_FAIL_ON", "--max_batch_size 9")
    path = write(tmp_path, "m.yaml", f"recipe_version: 1\nname: t\nsource: {{path: {tiny_model('gqa')}}}\n"
                                     "engine: {max_seq_len: 256, max_input_len: 128}\nmatrix:\n  engine.max_batch_size: [9, 8]\n")
    code, out, err = run_cli(capsys, "build", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert code == 1
    assert "1 of 2 recipe(s) built" in out
    assert "t-max_batch_size-9  FAILED" in out and "trtllm-build failed with exit code 1" in out
    assert "t-max_batch_size-8  built" in out
    assert (tmp_path / "build" / "t-max_batch_size-8" / "engine" / "rank0.engine").is_file()
    assert not (tmp_path / "build" / "t-max_batch_size-9" / "recipe.lock").exists()

    code, out, err = run_cli(capsys, "build", str(path), "--cache-dir", str(tmp_path / "cache2"), "--fail-fast")
    assert code == 1 and "0 of 2 recipe(s) built" in out
    assert "t-max_batch_size-8  FAILED" in out and "not started" in out


def test_memory_budget_still_builds_everything(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = matrix_recipe(tmp_path, tiny_model("gqa"))
    code, out, err = run_cli(capsys, "build", str(path), "--cache-dir", str(tmp_path / "cache"), "--jobs", "2",
                             "--max-memory", "1M")
    assert code == 0, err
    assert "4 of 4 recipe(s) built, 5 stage(s) run for 4 recipes" in out


def test_ray_executor_builds_the_same_matrix(tiny_model, tmp_path, monkeypatch):
    # ray is a test dependency (the `test` extra): this runs wherever the README's test command does
    import ray

    from recipe_runner.pipeline.scheduler import RayExecutor
    from recipe_runner.stages.shard import _rank_pool

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join a cluster this machine happens to name
    model = tiny_model("gqa")
    # two variants, three tiny stages: convert once, shard at tp 1 and tp 2 (two rank files, sent out as tasks)
    def recipe(out: str) -> Path:
        return write(tmp_path, f"{out}.yaml", f"recipe_version: 1\nname: tiny\nsource: {{path: {model}}}\n"
                                              f"matrix:\n  mapping.tp_size: [1, 2]\noutput: {{dir: {out}}}\n")

    local = run_builds([make_plan(r) for r in load_recipes(recipe("local"))],
                       store=CacheStore(tmp_path / "c1"), executor=InlineExecutor(lambda _: None), echo=lambda _: None)
    # a cluster of its own on this machine, started here and shut down below
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_builds([make_plan(r) for r in load_recipes(recipe("ray"))],
                            store=CacheStore(tmp_path / "c2"), executor=RayExecutor("local", 2), echo=lambda _: None)
        # inside a Ray task the shard stage sends each rank file out as a Ray task of its own
        assert ray.get(ray.remote(lambda: type(_rank_pool(1)).__name__).remote()) == "_RayRankPool"
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    assert not remote.failures and len(remote.results) == 2
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["tiny-tp1", "tiny-tp2"]
    assert _outputs(local) == _outputs(remote)


def test_log_lines_of_a_matrix_name_their_variants(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "m.yaml", "recipe_version: 1\nname: tiny\nsource: {path: %s}\n"
                 "matrix:\n  mapping.tp_size: [1, 2]\n" % tiny_model("gqa"))
    code, out, err = run_cli(capsys, "build", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    # the shared convert names both variants; each shard names its own, in its running and ran lines
    assert re.search(r"^\[convert tiny-tp1, tiny-tp2\] running \(", out, re.M), out
    assert re.search(r"^\[convert tiny-tp1, tiny-tp2\] ran in \d+\.\d s", out, re.M), out
    for variant in ("tiny-tp1", "tiny-tp2"):
        assert re.search(rf"^\[shard {variant}\] running \(", out, re.M), out
        assert re.search(rf"^\[shard {variant}\] ran in \d+\.\d s, peak RSS ", out, re.M), out
    # the summary's stage table: one row per job, with its time, peak memory and variants
    table = out.split("stages:\n", 1)[1].splitlines()
    assert re.fullmatch(r"  convert  ran +\d+\.\d s  peak \d+\.\d MiB +tiny-tp1, tiny-tp2", table[0]), table
    assert [row.split()[0] for row in table[:3]] == ["convert", "shard", "shard"]
