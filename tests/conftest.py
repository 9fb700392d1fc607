"""Shared fixtures: tiny seeded HF models (built once per session) and checkpoint helpers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Named tiny-model variants; every test that needs one of these asks `tiny_model(name)`.
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},  # 8 heads, 2 KV heads, vocab 1001 (odd), fp16
    "mha": {"num_key_value_heads": 8},
    "tied": {"tie_word_embeddings": True},
    "bf16": {"torch_dtype": "bfloat16"},
    "sharded": {"max_shard_size": "100KB"},
    "bin": {"weights_format": "bin"},
    "mistral": {"architecture": "MistralForCausalLM", "torch_dtype": "bfloat16"},
    "bias": {"attention_bias": True, "num_key_value_heads": 4},
    "mqa_headdim": {"num_key_value_heads": 1, "head_dim": 16, "num_hidden_layers": 3},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """tiny_model("gqa") or tiny_model(**make_tiny_llama kwargs): a cached model directory.

    Treat the returned directory as read-only; copy it (copy_model) before damaging it.
    """
    from recipe_runner.demo import make_tiny_llama

    cache: dict[str, Path] = {}

    def make(variant: str | None = None, **kwargs: Any) -> Path:
        if variant is not None:
            kwargs = {**MODEL_VARIANTS[variant], **kwargs}
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            cache[key] = make_tiny_llama(tmp_path_factory.mktemp("hf") / "model", **kwargs)
        return cache[key]

    return make


@pytest.fixture
def copy_model(tmp_path) -> Callable[[Path], Path]:
    """Copy a model directory into this test's tmp dir (to damage it safely)."""
    import shutil

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy-{src.parent.name}"
        shutil.copytree(src, dst)
        return dst

    return copy


def load_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model dir, read with the reference libraries (not our reader)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(model_dir.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def load_ranks(ckpt_dir: Path) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    config = json.loads((ckpt_dir / "config.json").read_text())
    world = config["mapping"]["world_size"]
    return config, [load_file(ckpt_dir / f"rank{r}.safetensors") for r in range(world)]


def reassemble(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Rebuild HF-named tensors from a TRT-LLM checkpoint, checking replication on the way.

    Independent of the converter: uses config.json and torch ops only. Asserts that replicated
    tensors are identical on every rank, duplicated KV heads are identical, and padded vocab rows
    are zeros; strips the padding and un-duplicates KV heads.
    """
    config, ranks = load_ranks(ckpt_dir)
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    L, nh = config["num_hidden_layers"], config["num_attention_heads"]
    nkv, d, V = config["num_key_value_heads"], config["head_size"], config["vocab_size"]
    kvl = max(nkv // tp, 1)
    stage_layers = [t.tolist() for t in torch.tensor_split(torch.arange(L), pp)]
    out: dict[str, torch.Tensor] = {}

    def same_on_all(tensors: list[torch.Tensor]) -> torch.Tensor:
        for t in tensors[1:]:
            assert torch.equal(t, tensors[0])
        return tensors[0]

    def strip_vocab(t: torch.Tensor) -> torch.Tensor:
        assert t.shape[0] == -(-V // tp) * tp
        assert torch.count_nonzero(t[V:]) == 0, "padded vocab rows must be zeros"
        return t[:V]

    for p in range(pp):
        stage = [ranks[p * tp + t] for t in range(tp)]
        for local, layer in enumerate(stage_layers[p]):
            get = lambda s: [r[f"transformer.layers.{local}.{s}"] for r in stage]  # noqa: E731
            pre = f"model.layers.{layer}."
            out[pre + "input_layernorm.weight"] = same_on_all(get("input_layernorm.weight"))
            out[pre + "post_attention_layernorm.weight"] = same_on_all(
                get("post_layernorm.weight"))
            for kind in ("weight", "bias"):
                if f"transformer.layers.{local}.attention.qkv.{kind}" not in stage[0]:
                    continue
                qs, ks, vs = zip(*(torch.split(t, [nh // tp * d, kvl * d, kvl * d])
                                   for t in get(f"attention.qkv.{kind}")))
                out[pre + f"self_attn.q_proj.{kind}"] = torch.cat(qs)
                for proj, parts in (("k_proj", ks), ("v_proj", vs)):
                    if nkv >= tp:
                        out[pre + f"self_attn.{proj}.{kind}"] = torch.cat(parts)
                    else:  # rank t holds head t*nkv//tp; every holder must agree
                        heads = [same_on_all([parts[t] for t in range(tp) if t * nkv // tp == h])
                                 for h in range(nkv)]
                        out[pre + f"self_attn.{proj}.{kind}"] = torch.cat(heads)
            out[pre + "self_attn.o_proj.weight"] = torch.cat(get("attention.dense.weight"), 1)
            if f"transformer.layers.{local}.attention.dense.bias" in stage[0]:
                out[pre + "self_attn.o_proj.bias"] = same_on_all(get("attention.dense.bias"))
            out[pre + "mlp.gate_proj.weight"] = torch.cat(get("mlp.fc.weight"))
            out[pre + "mlp.up_proj.weight"] = torch.cat(get("mlp.gate.weight"))
            out[pre + "mlp.down_proj.weight"] = torch.cat(get("mlp.proj.weight"), 1)
    first = [ranks[t] for t in range(tp)]
    last = [ranks[(pp - 1) * tp + t] for t in range(tp)]
    emb = [r["transformer.vocab_embedding.weight"] for r in first]
    if not config["use_parallel_embedding"]:
        out["model.embed_tokens.weight"] = same_on_all(emb)
    elif config["embedding_sharding_dim"] == 0:
        out["model.embed_tokens.weight"] = strip_vocab(torch.cat(emb))
    else:
        out["model.embed_tokens.weight"] = torch.cat(emb, 1)
    out["model.norm.weight"] = same_on_all([r["transformer.ln_f.weight"] for r in last])
    out["lm_head.weight"] = strip_vocab(torch.cat([r["lm_head.weight"] for r in last]))
    return out


@pytest.fixture
def reassemble_checkpoint() -> Callable[[Path], dict[str, torch.Tensor]]:
    return reassemble


@pytest.fixture
def hf_tensors() -> Callable[[Path], dict[str, torch.Tensor]]:
    return load_hf_tensors


@pytest.fixture
def checkpoint_ranks() -> Callable[[Path], tuple[dict[str, Any], list[dict[str, torch.Tensor]]]]:
    return load_ranks


# ---- quantization fixtures -------------------------------------------------------------------------

# A tiny model whose dims allow group size 64 with tp 2 (hidden 128, intermediate 256, head_dim 16).
QUANT_MODEL = {"hidden_size": 128, "intermediate_size": 256, "with_tokenizer": True}


def calibration_texts() -> list[str]:
    from recipe_runner.demo import _CORPUS

    return [f"{line} ({i})".replace("\n", " ") for i in range(3) for line in _CORPUS]  # one sample per line


@pytest.fixture(scope="session")
def quant_model(tiny_model) -> Path:
    """Tiny LLaMA with a tokenizer, shaped for every quantization algo at tp 1 and 2."""
    return tiny_model(**QUANT_MODEL)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(calibration_texts()) + "\n")
    return path


@pytest.fixture(scope="session")
def calibration(quant_model, calib_file, tmp_path_factory):
    """Statistics of every family (AWQ with group 64) over calib_file, written once: (stats, dir)."""
    from recipe_runner.stages.calibrate import CalibrationSettings, calibrate

    out = tmp_path_factory.mktemp("stats")
    settings = CalibrationSettings("calib.txt", calib_file, num_samples=12, max_seq_len=24, seed=0, batch_size=4,
                                   statistics=("awq", "smoothquant", "kv"), group_size=64)
    return calibrate(quant_model, settings, out), out


@pytest.fixture(scope="session")
def hf_exported(quant_model, calibration, tmp_path_factory):
    """hf_exported(target, algo, kv[, exclude]): quant_model exported to a Hugging Face target (group 64),
    once per argument set; `exclude` is quantization.exclude_modules."""
    from recipe_runner.hfexport.export import export_checkpoint
    from recipe_runner.quant.settings import QuantSettings

    stats, _ = calibration
    cache: dict[tuple, Path] = {}

    def get(target: str, algo: str, kv: str, exclude: tuple[str, ...] = ("lm_head",)) -> Path:
        key = (target, algo, kv, exclude)
        if key not in cache:
            out = tmp_path_factory.mktemp("hf-export")
            export_checkpoint(quant_model, stats, QuantSettings(algo, kv, 64, exclude_modules=exclude), target,
                              "float16", out)
            cache[key] = out
        return cache[key]
    return get


# ---- the real-model tier (tests marked real_model) --------------------------------------------------

from tests.real_model import smollm2_model, smollm2_source, smollm2_store  # noqa: E402,F401  (fixtures)
