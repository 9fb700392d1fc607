"""The model layout (models/): LLaMA's facts as hand-checked values, the tensors a real checkpoint
holds, the names and shapes the shard planner writes, and one split rule for plain and quantized
tensors alike."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from safetensors import safe_open

from recipe_runner.hf.config import SUPPORTED_ARCHITECTURES, ModelConfig, read_model_config
from recipe_runner.models import LAYOUTS, layout_for
from recipe_runner.models.layout import OUT_SPLITS, ROW, InputGroup, ModelLayout, Projection
from recipe_runner.models.llama import LLAMA
from recipe_runner.stages.manifest import Concat, Read, SourceTensor
from recipe_runner.stages.quantized import QuantizedArtifact, TensorRule, rank_tensor
from recipe_runner.stages.shard_plan import plan_convert
from recipe_runner.trtllm.mapping import ParallelMapping

Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


def _checkpoint_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor the model directory's safetensors files hold."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({n: tuple(st.get_slice(n).get_shape()) for n in st.keys()})
    return out


@pytest.mark.parametrize("variant", ["gqa", "tied", "mistral", "bias", "mqa_headdim"])
def test_layout_tensors_are_what_transformers_writes(variant, tiny_model):
    model = tiny_model(variant)
    cfg = read_model_config(model)
    assert layout_for(cfg).hf_tensors(cfg) == _checkpoint_shapes(model)


def test_mlp_bias_tensors():
    cfg = ModelConfig("LlamaForCausalLM", 10, 8, 12, 1, 2, 1, 4, mlp_bias=True)
    tensors = LLAMA.hf_tensors(cfg)
    assert {n: s for n, s in tensors.items() if n.endswith(".bias")} == {
        "model.layers.0.mlp.gate_proj.bias": (12,), "model.layers.0.mlp.up_proj.bias": (12,),
        "model.layers.0.mlp.down_proj.bias": (8,)}
    assert tensors["model.layers.0.self_attn.k_proj.weight"] == (4, 8)
    assert tensors["model.layers.0.self_attn.o_proj.weight"] == (8, 8)


def test_llama_facts():
    assert [(lin.name, lin.projections, lin.parallel) for lin in LLAMA.linears] == [
        ("attention.qkv", (Q, K, V), "column"), ("attention.dense", (O,), "row"),
        ("mlp.fc", (GATE,), "column"), ("mlp.gate", (UP,), "column"), ("mlp.proj", (DOWN,), "row")]
    assert [(g.projections, g.norm and (g.norm.hf_weight, g.norm.trtllm_weight)) for g in LLAMA.groups] == [
        ((Q, K, V), ("input_layernorm.weight", "input_layernorm.weight")), ((O,), None),
        ((GATE, UP), ("post_attention_layernorm.weight", "post_layernorm.weight")), ((DOWN,), None)]
    assert {p.hf: p.split for p in LLAMA.projections} == {
        Q: "q_heads", K: "kv_heads", V: "kv_heads", O: "row", GATE: "column", UP: "column", DOWN: "row"}
    assert LLAMA.fused == {"self_attn.qkv_proj": (Q, K, V), "mlp.gate_up_proj": (GATE, UP)}
    assert (LLAMA.query, LLAMA.key, LLAMA.value) == (Q, K, V)
    assert LLAMA.hf_layer_tensor(3, Q + ".weight") == "model.layers.3.self_attn.q_proj.weight"
    assert LLAMA.trtllm_layer_tensor(0, "mlp.fc") == "transformer.layers.0.mlp.fc"
    assert LLAMA.trtllm_modules(1) == ["transformer.vocab_embedding", "lm_head", "transformer.layers.0.attention.qkv",
                                       "transformer.layers.0.attention.dense", "transformer.layers.0.mlp.fc",
                                       "transformer.layers.0.mlp.gate", "transformer.layers.0.mlp.proj"]


@pytest.mark.parametrize("layout", sorted(set(LAYOUTS.values()), key=lambda x: x.name), ids=lambda x: x.name)
def test_every_projection_has_one_split_one_group_one_linear(layout):
    for p in layout.projections:
        assert p.split in (*OUT_SPLITS, ROW)
        assert [g for g in layout.groups if p.hf in g.projections] == [layout.group_of(p.hf)]
        assert [lin for lin in layout.linears if p.hf in lin.projections] == [layout.linear_of(p.hf)]
        assert layout.linear_of(p.hf).parallel == p.parallel
        assert p.split_of("bias") == ("replicated" if p.split == ROW else p.split)


def test_inconsistent_layouts_are_refused():
    with pytest.raises(ValueError, match="do not hold each projection once"):
        dataclasses.replace(LLAMA, groups=LLAMA.groups[:-1])
    row_fused = tuple(dataclasses.replace(p, module="mlp.fc") if p.hf == DOWN else p for p in LLAMA.projections)
    with pytest.raises(ValueError, match="mlp.fc fuses projections"):
        dataclasses.replace(LLAMA, projections=row_fused)
    mixed = (InputGroup((Q,), LLAMA.groups[0].norm), InputGroup((K, V), None), *LLAMA.groups[1:])
    with pytest.raises(ValueError, match="attention.qkv fuses projections of different inputs"):
        dataclasses.replace(LLAMA, groups=mixed)
    assert isinstance(LLAMA, ModelLayout) and isinstance(LLAMA.projection(Q), Projection)


def test_architectures_are_the_layouts():
    assert SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM")
    assert all(LAYOUTS[a] is LLAMA for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="no model layout for architecture 'GPT2LMHeadModel'"):
        layout_for(ModelConfig("GPT2LMHeadModel", 10, 8, 12, 1, 2, 1, 4))


def test_models_package_is_data():
    code = ("import sys, recipe_runner.models\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('recipe_runner.stages', "
            "'recipe_runner.pipeline', 'recipe_runner.hfexport'))]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_planner_writes_the_layout_names_and_shapes(tiny_model):
    # gqa: 8 heads, 2 KV heads, head_dim 8, hidden 64, intermediate 128, vocab 1001, 4 layers; tp 2
    rank = plan_convert(tiny_model("gqa"), mapping=ParallelMapping(tp_size=2, pp_size=2)).ranks[1]
    assert (rank.tp_rank, rank.pp_rank, rank.layers) == (1, 0, (0, 1))
    shapes = {t.name: t.shape for t in rank.tensors}
    layer0 = {n.removeprefix("transformer.layers.0."): s for n, s in shapes.items()
              if n.startswith("transformer.layers.0.")}
    assert layer0 == {"input_layernorm.weight": (64,), "attention.qkv.weight": (48, 64),
                      "attention.dense.weight": (64, 32), "post_layernorm.weight": (64,),
                      "mlp.fc.weight": (64, 64), "mlp.gate.weight": (64, 64), "mlp.proj.weight": (64, 64)}
    assert shapes["transformer.vocab_embedding.weight"] == (1001, 64)
    last = plan_convert(tiny_model("gqa"), mapping=ParallelMapping(tp_size=2, pp_size=2)).ranks[3]
    assert {t.name: t.shape for t in last.tensors if not t.name.startswith("transformer.layers.")} == {
        "transformer.ln_f.weight": (64,), "lm_head.weight": (501, 64)}
    expected = {LLAMA.trtllm_layer_tensor(0, n) for n in
                [g.norm.trtllm_weight for g in LLAMA.groups if g.norm] + [f"{lin.name}.weight" for lin in LLAMA.linears]}
    assert set(shapes) >= expected


def test_quantized_rules_cut_as_the_planner_does(tiny_model):
    """A quantize-stage "out"/"in" rule reads the same rows/columns as the plain plan (KV duplication at tp 4)."""
    model = tiny_model("gqa")
    cfg = read_model_config(model)
    names = {p: f"model.layers.0.{p}.qweight" for p in (Q, K, V, O)}
    tensors = {names[p]: SourceTensor("int8", LLAMA.projection(p).shape(cfg)) for p in names}
    qkv_rule = TensorRule("attention.qkv.weight", "out", tuple((p, names[p]) for p in (Q, K, V)))
    dense_rule = TensorRule("attention.dense.weight", "in", ((O, names[O]),))
    artifact = QuantizedArtifact("fp8", "none", {}, {0: (qkv_rule, dense_rule)}, tensors)
    manifest = plan_convert(model, mapping=ParallelMapping(tp_size=4))
    for rank in manifest.ranks:
        plain = {t.name: t.source for t in rank.tensors}
        for rule, hf_name in ((qkv_rule, "attention.qkv.weight"), (dense_rule, "attention.dense.weight")):
            quantized = rank_tensor(rule, artifact, cfg, 4, rank.tp_rank, 0).source
            want = plain[f"transformer.layers.0.{hf_name}"]
            parts = want.parts if isinstance(want, Concat) else (want,)
            got = quantized.parts if isinstance(quantized, Concat) else (quantized,)
            assert [(r.dim, r.start, r.stop) for r in got] == [(r.dim, r.start, r.stop) for r in parts]
            assert all(isinstance(r, Read) for r in got)
