"""Calibration data: local files, the HF cache, sampling by seed, and the errors a user can fix."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recipe_runner.calibration.dataset import locate_dataset, read_texts, sample_texts
from recipe_runner.errors import UserError


def _texts(path, field="text", split="train", value=None):
    return read_texts(locate_dataset(value or path.name, path, split), field)


def test_txt_is_one_sample_per_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first sample\n\n  \nsecond sample\n")
    assert _texts(path) == ["first sample", "second sample"]


def test_jsonl_and_json_read_the_text_field(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"article": "a b", "id": 1}) + "\n\n" + json.dumps({"article": "c d"}) + "\n")
    assert _texts(jsonl, "article") == ["a b", "c d"]
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert _texts(as_json) == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    ("", "holds no calibration samples"),
    ("\n \n", "holds no calibration samples"),
])
def test_empty_file_is_named(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        _texts(path)
    assert "quantization.calibration.dataset" in str(err.value) and str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="calibration file .*missing.jsonl not found"):
        locate_dataset("data/missing.jsonl", tmp_path / "data" / "missing.jsonl", "train")


def test_missing_text_field_names_the_line_and_the_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:2: no field 'text' \(fields: body\)"):
        _texts(path)


def test_sampling_is_deterministic_in_the_seed():
    texts = [f"t{i}" for i in range(50)]
    assert sample_texts(texts, 10, 3) == sample_texts(texts, 10, 3)
    assert sample_texts(texts, 10, 3) != sample_texts(texts, 10, 4)
    assert sorted(sample_texts(texts, 100, 0)) == sorted(texts)  # fewer than asked: all of them


def _hub_dataset(root, files: dict[str, str]):
    repo = root / "datasets--acme--calib"
    snap = repo / "snapshots" / ("a" * 40)
    for rel, text in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)


def test_dataset_from_the_local_hf_cache_by_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_dataset(tmp_path / "hub", {"data/train.jsonl": json.dumps({"text": "train text"}) + "\n",
                                    "data/validation.jsonl": json.dumps({"text": "val text"}) + "\n"})
    found = locate_dataset("acme/calib", tmp_path / "acme" / "calib", "validation")
    assert read_texts(found, "text") == ["val text"]
    with pytest.raises(UserError, match="no files for split 'test'"):
        locate_dataset("acme/calib", None, "test")


def test_unknown_dataset_id_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        locate_dataset("acme/nothing", tmp_path / "acme" / "nothing", "train")
    assert str(error.value) == (
        f"quantization.calibration.dataset: 'acme/nothing' is not a local file ({tmp_path / 'acme' / 'nothing'}), "
        f"and the dataset is not in the local Hugging Face cache {tmp_path / 'hub'} ($HF_HUB_CACHE): no "
        "datasets--acme--nothing there; fetch it once with `hf download acme/nothing --repo-type dataset` or "
        "point to a .txt/.jsonl file")


@pytest.mark.parametrize("env, cache, origin", [
    ({"HF_HOME": "{t}/home"}, "{t}/home/hub", "$HF_HOME/hub"),
    ({"HF_HOME": "{t}/home", "HF_HUB_CACHE": "{t}/hub"}, "{t}/hub", "$HF_HUB_CACHE"),
    ({"HUGGINGFACE_HUB_CACHE": "{t}/legacy"}, "{t}/legacy", "$HUGGINGFACE_HUB_CACHE"),
    ({"XDG_CACHE_HOME": "{t}/xdg"}, "{t}/xdg/huggingface/hub", "$XDG_CACHE_HOME/huggingface/hub"),
    ({"HOME": "{t}"}, "{t}/.cache/huggingface/hub", "the default; HF_HUB_CACHE and HF_HOME are unset"),
])
def test_the_searched_cache_is_resolved_as_huggingface_hub_does(tmp_path, monkeypatch, env, cache, origin):
    from recipe_runner.hf.hub_cache import hub_cache_origin

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(t=tmp_path))
    assert hub_cache_origin() == (Path(cache.format(t=tmp_path)), origin)
    with pytest.raises(UserError, match=re.escape(f"not in the local Hugging Face cache {cache.format(t=tmp_path)} "
                                                  f"({origin}): no datasets--acme--nothing there")):
        locate_dataset("acme/nothing", None, "train")


REV_B = "b" * 39 + "c"


def test_revision_selects_the_snapshot_and_a_missing_one_is_named_in_full(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_dataset(tmp_path / "hub", {"data/train.jsonl": json.dumps({"text": "at main"}) + "\n"})
    other = tmp_path / "hub" / "datasets--acme--calib" / "snapshots" / REV_B / "data"
    other.mkdir(parents=True)
    (other / "train.jsonl").write_text(json.dumps({"text": "pinned"}) + "\n")
    assert read_texts(locate_dataset("acme/calib", None, "train"), "text") == ["at main"]  # refs/main
    found = locate_dataset("acme/calib", None, "train", REV_B)
    assert found.revision == REV_B and read_texts(found, "text") == ["pinned"]
    assert locate_dataset("acme/calib", None, "train").revision == "a" * 40
    typo = "b" * 40  # the last digit differs
    with pytest.raises(UserError) as error:
        locate_dataset("acme/calib", None, "train", typo)
    assert str(error.value) == (
        f"quantization.calibration.revision: dataset 'acme/calib' at revision {typo} is not in the local Hugging "
        f"Face cache {tmp_path / 'hub'} ($HF_HUB_CACHE): datasets--acme--calib has no snapshot {typo} (it holds "
        f"{'a' * 40}, {REV_B}); fetch it once with `hf download acme/calib --repo-type dataset --revision {typo}` "
        "or set revision to one it holds")


def test_several_snapshots_without_refs_main_ask_for_a_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_dataset(tmp_path / "hub", {"train.txt": "one\n"})
    repo = tmp_path / "hub" / "datasets--acme--calib"
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / REV_B).mkdir()
    with pytest.raises(UserError, match=re.escape(f"holds 2 snapshots of dataset 'acme/calib' ({'a' * 40}, {REV_B}) "
                                                  "and no refs/main naming one; set "
                                                  "quantization.calibration.revision to the one to use")):
        locate_dataset("acme/calib", None, "train")
    assert read_texts(locate_dataset("acme/calib", None, "train", "a" * 40), "text") == ["one"]


def test_revision_of_a_local_file_is_refused(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("x\n")
    with pytest.raises(UserError, match="quantization.calibration.revision: applies to a dataset in the local "
                                        "Hugging Face cache"):
        locate_dataset("calib.txt", path, "train", "a" * 40)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_dataset(tmp_path / "hub", {"data/train-00000-of-00001.parquet": "not really parquet"})
    with pytest.raises(UserError, match="reading .parquet needs pyarrow"):
        read_texts(locate_dataset("acme/calib", None, "train"), "text")


def test_source_without_tokenizer_is_named(tiny_model):
    from recipe_runner.calibration.tokens import load_tokenizer

    model = tiny_model("gqa")  # written without tokenizer files
    with pytest.raises(UserError, match=f"{model} has no tokenizer"):
        load_tokenizer(model)
