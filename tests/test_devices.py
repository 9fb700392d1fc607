"""--device: the spec's parsing and errors, calibration on several devices giving the bytes of one, the
device kind in the calibrate and verify keys (never on CPU) and in the lock, verify's figures on CPU
unchanged, and a Ray task of a CUDA stage asking for its GPUs. No GPU here: the CUDA query is replaced
(`cuda_info`) and a pretend CUDA kind runs on CPU."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recipe_runner import devices as dev
from recipe_runner.devices import CPU_CHOICE, CudaInfo, DeviceChoice, parse_device
from recipe_runner.errors import UserError
from recipe_runner.pipeline.plan import make_plan
from recipe_runner.recipe import load_recipe
from tests.recipe_files import run_cli

H200 = "NVIDIA H200"
PRETEND = DeviceChoice(("cpu",), f"cuda/{H200}", "cuda")  # a GPU kind computing on CPU: keys and locks only


@pytest.fixture
def gpus(monkeypatch):
    """gpus(*names): torch pretends to see these CUDA devices."""
    def set_(*names: str, version: str = "2.13.0+cu128") -> None:
        monkeypatch.setattr(dev, "cuda_info", lambda: CudaInfo(len(names), tuple(names), version))
    monkeypatch.delenv(dev.ENV, raising=False)
    return set_


def test_cpu_never_asks_cuda(monkeypatch):
    monkeypatch.delenv(dev.ENV, raising=False)
    monkeypatch.setattr(dev, "cuda_info", lambda: pytest.fail("cpu asked torch about CUDA"))
    assert parse_device("cpu") == DeviceChoice(("cpu",), "cpu", "cpu") == parse_device(None) == CPU_CHOICE
    assert parse_device(" CPU ").names == ("cpu",) and CPU_CHOICE.key_param() == {}


def test_cuda_specs(gpus, monkeypatch):
    gpus(H200, H200)
    assert parse_device("auto") == DeviceChoice(("cuda:0", "cuda:1"), f"cuda/{H200}", "auto")
    assert parse_device("cuda").names == ("cuda:0",)
    assert parse_device("cuda:1").names == ("cuda:1",)
    assert parse_device("cuda:1,cuda:0").names == ("cuda:1", "cuda:0")
    assert parse_device("cuda:0").key_param() == {"device": f"cuda/{H200}"}
    monkeypatch.setenv(dev.ENV, "cuda:1")
    assert parse_device(None) == DeviceChoice(("cuda:1",), f"cuda/{H200}", "cuda:1")
    assert parse_device("cpu").is_cpu  # the flag wins over the environment
    gpus()
    assert parse_device("auto") == DeviceChoice(("cpu",), "cpu", "auto")


@pytest.mark.parametrize("spec, names, message", [
    ("cuda", (), "--device cuda: torch sees no CUDA device (torch 2.13.0+cpu is a CPU build); use --device cpu or auto"),
    ("cuda:2", (H200, H200), "--device cuda:2: torch sees 2 CUDA device(s) (cuda:0 to cuda:1), not cuda:2"),
    ("gpu", (H200,), "--device gpu: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or a comma list cuda:0,cuda:1"),
    ("cuda:x", (H200,), "--device cuda:x: 'cuda:x' is not a device; use auto, cpu, cuda, cuda:N or a comma list "
                        "cuda:0,cuda:1"),
    ("cuda:0,cuda:0", (H200,), "--device cuda:0,cuda:0: names a device twice"),
    ("cpu,cuda:0", (H200,), "--device cpu,cuda:0: cpu cannot be combined with CUDA devices; use --device cpu alone"),
    ("auto", (H200, "NVIDIA A100"), "--device auto: the devices are of different models (NVIDIA A100, NVIDIA H200); "
                                    "results differ between models, so give devices of one model"),
    ("", (H200,), "--device : empty; use auto, cpu, cuda, cuda:N or a comma list cuda:0,cuda:1"),
])
def test_bad_specs_are_one_line(gpus, spec, names, message):
    gpus(*names, version="2.13.0+cpu")
    with pytest.raises(UserError) as caught:
        parse_device(spec)
    assert str(caught.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_the_real_query_on_a_cpu_torch(monkeypatch):
    monkeypatch.delenv(dev.ENV, raising=False)
    with pytest.raises(UserError, match=r"^--device cuda:0: torch sees no CUDA device \(torch .*\); use --device cpu"):
        parse_device("cuda:0")
    assert parse_device("auto") == DeviceChoice(("cpu",), "cpu", "auto")


# ---- calibration on several devices ----------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny runs are ~20x faster on a loaded machine (bytes compare between runs
    of the same test only)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _calibrate(model: Path, calib_file: Path, out: Path, devices: tuple[str, ...], **kwargs) -> Path:
    from recipe_runner.stages.calibrate import CalibrationSettings, calibrate

    settings = CalibrationSettings("calib.txt", calib_file, num_samples=10, max_seq_len=16, seed=0, batch_size=2,
                                   **kwargs)
    out.mkdir()
    calibrate(model, settings, out, devices=devices)
    return out


def _artifact(directory: Path) -> tuple[bytes, bytes]:
    return (directory / "statistics.safetensors").read_bytes(), (directory / "calibration.json").read_bytes()


@pytest.mark.parametrize("family", ["awq", "smoothquant-auto"])
def test_several_devices_give_the_bytes_of_one(quant_model, calib_file, tmp_path, family):
    from recipe_runner.quant.sq_auto import AlphaSearch

    kwargs = ({"statistics": ("awq", "kv"), "group_size": 64} if family == "awq" else
              {"statistics": ("smoothquant",), "smoothquant_search": AlphaSearch("w8a8_sq_per_channel_per_token")})
    one = _artifact(_calibrate(quant_model, calib_file, tmp_path / "one", ("cpu",), **kwargs))
    again = _artifact(_calibrate(quant_model, calib_file, tmp_path / "again", ("cpu",), **kwargs))
    two = _artifact(_calibrate(quant_model, calib_file, tmp_path / "two", ("cpu", "cpu"), **kwargs))
    three = _artifact(_calibrate(quant_model, calib_file, tmp_path / "three", ("cpu",) * 3, **kwargs))
    assert one == again == two == three  # 5 batches: devices get 3+2 and 2+2+1 of them
    meta = json.loads(one[1])
    assert meta["batches"] == 5 and (meta["awq"] if family == "awq" else meta["smoothquant"]["groups"])


def test_threaded_reduction_folds_in_batch_order(quant_model, calib_file, tmp_path, monkeypatch):
    """The several-CUDA-devices path (a thread per device, partials folded in batch order) run on CPU."""
    from recipe_runner.calibration import runner

    kwargs = {"statistics": ("awq", "kv"), "group_size": 64}
    one = _artifact(_calibrate(quant_model, calib_file, tmp_path / "one", ("cpu",), **kwargs))
    monkeypatch.setattr(runner, "_threaded", lambda devices: len(devices) > 1)
    assert _artifact(_calibrate(quant_model, calib_file, tmp_path / "two", ("cpu", "cpu"), **kwargs)) == one


# ---- read-ahead ------------------------------------------------------------------------------------

def test_read_ahead_loads_the_next_item_in_its_thread_and_raises_at_take():
    from recipe_runner.device_compute import ReadAhead

    loaded: list[tuple[int, str]] = []
    started_one = threading.Event()

    def load(i: int) -> int:
        loaded.append((i, threading.current_thread().name))
        if i == 1:
            started_one.set()
        if i == 2:
            raise OSError("disk gone at 2")
        return i * 10

    with ReadAhead(load, 4, enabled=True) as ahead:
        assert ahead.take(0) == 0
        assert started_one.wait(10)  # item 1 loads before anyone takes it
        assert ahead.take(1) == 10
        with pytest.raises(OSError, match="disk gone at 2"):
            ahead.take(2)
    # item 3 was queued behind 2 and cancelled or loaded by close; every load ran in the read-ahead thread
    assert [i for i, _ in loaded][:3] == [0, 1, 2] and len(loaded) <= 4
    assert all(t.startswith("read-ahead") for _, t in loaded)
    here: list[int] = []
    plain = ReadAhead(lambda i: here.append(i) or threading.current_thread().name, 3, enabled=False)
    assert [plain.take(i) for i in range(3)] == [threading.current_thread().name] * 3 and here == [0, 1, 2]
    plain.close()


@pytest.mark.parametrize("family", ["awq", "smoothquant-auto"])
def test_calibration_reading_ahead_gives_the_same_bytes(quant_model, calib_file, tmp_path, monkeypatch, family):
    """The CUDA default (the next layer read by a thread while this one runs), forced on CPU."""
    import functools

    from recipe_runner.calibration import runner
    from recipe_runner.quant.sq_auto import AlphaSearch
    from recipe_runner.stages import calibrate as calibrate_stage

    kwargs = ({"statistics": ("awq", "kv"), "group_size": 64} if family == "awq" else
              {"statistics": ("smoothquant",), "smoothquant_search": AlphaSearch("w8a8_sq_per_channel_per_token")})
    plain = _artifact(_calibrate(quant_model, calib_file, tmp_path / "plain", ("cpu",), **kwargs))
    loads: list[tuple[int, str]] = []
    real = runner.layer_tensors

    def recorded(config, layer_cls, reader, prefix, index):
        loads.append((index, threading.current_thread().name))
        return real(config, layer_cls, reader, prefix, index)

    monkeypatch.setattr(runner, "layer_tensors", recorded)
    monkeypatch.setattr(calibrate_stage, "RunnerOptions", functools.partial(runner.RunnerOptions, read_ahead=True))
    ahead = _artifact(_calibrate(quant_model, calib_file, tmp_path / "ahead", ("cpu", "cpu"), **kwargs))
    assert ahead == plain
    layers = json.loads((quant_model / "config.json").read_text())["num_hidden_layers"]
    assert [i for i, _ in loads] == list(range(layers)) and all(t.startswith("read-ahead") for _, t in loads)


# ---- keys, plan, lock ------------------------------------------------------------------------------

RECIPE = """\
recipe_version: 1
name: on-device
source:
  path: {model}
mapping:
  tp_size: 1
quantization:
  algo: fp8
  calibration:
    dataset: {calib}
    num_samples: 4
    max_seq_len: 16
    batch_size: 2
verify:
  token_ids: [[1, 2, 3, 4]]
output:
  dir: out
"""


@pytest.fixture
def recipe(quant_model, calib_file, tmp_path) -> Path:
    path = tmp_path / "on-device.yaml"
    path.write_text(RECIPE.format(model=quant_model, calib=calib_file))
    return path


def test_the_device_kind_enters_calibrate_and_verify_keys_only_off_cpu(recipe, tmp_path):
    from recipe_runner.pipeline.resolve import resolve
    from recipe_runner.store.cache import CacheStore

    store = CacheStore(tmp_path / "cache")
    today = resolve(make_plan(load_recipe(recipe)), store)
    cpu = resolve(make_plan(load_recipe(recipe), device=CPU_CHOICE), store)
    gpu = resolve(make_plan(load_recipe(recipe), device=PRETEND), store)
    keys = lambda r: {s.stage.name: s.key.digest for s in r.statuses}  # noqa: E731
    assert keys(today) == keys(cpu)
    assert all("device" not in s.stage.params for s in cpu.statuses)
    assert gpu.plan.stage("calibrate").params["device"] == gpu.plan.stage("verify").params["device"] == f"cuda/{H200}"
    changed = {n for n in keys(cpu) if keys(cpu)[n] != keys(gpu)[n]}
    # quantize and shard read calibrate's key, so they follow it; convert does not compute on the device
    assert changed == {"calibrate", "quantize", "shard", "verify"} and "device" not in gpu.plan.stage("quantize").params
    assert gpu.plan.to_dict()["device"] == {"kind": f"cuda/{H200}", "devices": ["cpu"]}
    assert "device" not in cpu.plan.to_dict()


def test_plan_states_the_device_and_calibrations_peak(recipe, gpus, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "plan", str(recipe), "--cache-dir", str(tmp_path / "c"))
    assert code == 0 and "\n  device  cpu; calibrate peaks at ~" in out
    gpus(H200, H200)
    code, out, err = run_cli(capsys, "plan", str(recipe), "--device", "auto", "--cache-dir", str(tmp_path / "c"))
    # hidden 128, intermediate 256: a layer is (4·128² + 3·256·128)·4 B = 640 KiB; 4 × 16 tokens × 128 × 4 B / 2
    assert code == 0, err
    assert (f"\n  device  cuda/{H200} (cuda:0, cuda:1); calibrate peaks at ~656.0 KiB per device (one decoder "
            "layer in float32 + the calibration activations)\n") in out
    assert f'device="cuda/{H200}"' in out
    gpus()
    code, _, err = run_cli(capsys, "plan", str(recipe), "--device", "cuda:0", "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "--device cuda:0: torch sees no CUDA device" in err and "Traceback" not in err


def test_the_lock_records_the_kind_and_a_cpu_rebuild_says_why(recipe, tmp_path, capsys):
    from recipe_runner.pipeline.build import run_build
    from recipe_runner.pipeline.execute import device_problems
    from recipe_runner.pipeline.resolve import resolve
    from recipe_runner.store.cache import CacheStore
    from recipe_runner.store.lock import read_lock

    store = CacheStore(tmp_path / "cache")
    result = run_build(make_plan(load_recipe(recipe), until="calibrate", device=PRETEND), store=store,
                       echo=lambda _: None)
    lock = read_lock(result.lock_path)
    assert [(s["name"], s.get("device")) for s in lock.stages] == [("convert", None), ("calibrate", f"cuda/{H200}")]
    code, _, err = run_cli(capsys, "build", str(recipe), "--until", "calibrate", "--locked", str(result.lock_path),
                           "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "Traceback" not in err
    assert (f"calibrate: the lock's key was made on cuda/{H200}, this build runs on cpu (results differ between "
            "device kinds); build with --device cuda or re-lock") in err
    cpu_lock = json.loads(result.lock_path.read_text())
    del cpu_lock["stages"][1]["device"]
    (tmp_path / "cpu.lock").write_text(json.dumps(cpu_lock))
    on_gpu = resolve(make_plan(load_recipe(recipe), until="calibrate", device=PRETEND), store)
    assert device_problems(on_gpu, read_lock(tmp_path / "cpu.lock")) == [
        f"calibrate: the lock's key was made on cpu, this build runs on cuda/{H200} (results differ between device "
        "kinds); build with --device cpu or re-lock"]


def test_a_cpu_lock_has_no_device(recipe, tmp_path):
    from recipe_runner.pipeline.build import run_build
    from recipe_runner.store.cache import CacheStore

    result = run_build(make_plan(load_recipe(recipe), until="calibrate"), store=CacheStore(tmp_path / "cache"),
                       echo=lambda _: None)
    stages = json.loads(result.lock_path.read_text())["stages"]
    assert [sorted(s) for s in stages] == [["key", "name"], ["key", "name"]]


# ---- verify ----------------------------------------------------------------------------------------

def test_verify_on_cpu_gives_todays_logits(quant_model, tmp_path):
    from recipe_runner.api import convert
    from recipe_runner.reference import HFLayerwiseModel, ReferenceModel
    from recipe_runner.verify.run import verify_checkpoint
    from recipe_runner.verify.trace import run_lockstep

    ckpt = convert(quant_model, tmp_path / "ckpt", tp_size=2, dtype="float32")
    sequences = [[1, 2, 3, 4, 5], [7, 8, 9]]
    source, reference = HFLayerwiseModel(quant_model), ReferenceModel(ckpt)
    expected, got, trace = run_lockstep(source, reference, sequences, device=torch.device("cpu"))
    # the plain layer loop (reference/layerwise.forward_logits), which knows nothing of devices
    for mine, plain in ((expected, source.logits(sequences)), (got, reference.logits(sequences))):
        assert all(torch.equal(a, b) and a.device.type == "cpu" and a.dtype == torch.float32
                   for a, b in zip(mine, plain))
    ahead = run_lockstep(source, reference, sequences, device=torch.device("cpu"), read_ahead=True)
    assert all(torch.equal(a, b) for a, b in zip(ahead[0] + ahead[1], expected + got)) and ahead[2] == trace
    default = verify_checkpoint(ckpt, quant_model, token_ids=sequences)
    on_cpu = verify_checkpoint(ckpt, quant_model, token_ids=sequences, device="cpu")
    assert default.figures == on_cpu.figures and default.trace == on_cpu.trace and on_cpu.passed


# ---- Ray ---------------------------------------------------------------------------------------------

class _FakeRemote:
    def __init__(self, calls: list):
        self.calls, self.gpus = calls, 0

    def options(self, *, num_gpus: int) -> "_FakeRemote":
        other = _FakeRemote(self.calls)
        other.gpus = num_gpus
        return other

    def remote(self, task):
        self.calls.append((task.stage, self.gpus, task.device))
        return SimpleNamespace(future=lambda: None)


def test_ray_tasks_of_a_cuda_plans_computing_stages_ask_for_its_gpus():
    from recipe_runner.pipeline.scheduler import RayExecutor, StageTask

    calls: list = []
    executor = RayExecutor.__new__(RayExecutor)  # no ray here: the remote function is a fake
    executor.remote = _FakeRemote(calls)
    two = DeviceChoice(("cuda:2", "cuda:3"), f"cuda/{H200}", "cuda:2,cuda:3")
    for choice in (two, CPU_CHOICE):
        resolved = SimpleNamespace(plan=SimpleNamespace(device=choice))
        for stage in ("convert", "calibrate", "verify"):
            task = StageTask("r.yaml", {}, None, ".", "cache", stage, "k", 1, device=choice.spec)
            executor.start(resolved, stage, {}, None, 1, task)
    assert calls == [("convert", 0, "cuda:2,cuda:3"), ("calibrate", 2, "cuda:0,cuda:1"), ("verify", 2, "cuda:0,cuda:1"),
                     ("convert", 0, "cpu"), ("calibrate", 0, "cpu"), ("verify", 0, "cpu")]
