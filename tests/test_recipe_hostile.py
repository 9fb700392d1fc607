"""Hostile recipes are refused cleanly: exit 2, one located line, no traceback, in bounded time and memory."""
from __future__ import annotations

import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from recipe_runner.recipe.limits import (MAX_FILE_BYTES, MAX_FORMAT_WIDTH, MAX_TEMPLATE_INT_BITS,
                                         MAX_TEMPLATE_OUTPUT, MAX_TEMPLATE_SECONDS, MAX_YAML_DEPTH, MAX_YAML_NODES)
from tests.recipe_files import MINIMAL, REPO, run_cli, write

SECONDS = 10  # generous: the limits stop each case well within MAX_TEMPLATE_SECONDS (+ parse time)


def _refused(capsys, *argv: str) -> str:
    """Run `recipe ARGV`; assert it fails with exit 2 and exactly one line, no traceback; return the line."""
    start = time.monotonic()
    code, out, err = run_cli(capsys, *argv)
    elapsed = time.monotonic() - start
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    return err.rstrip("\n")


def _peak_mib(fn) -> float:
    """Peak Python allocation while fn() runs, in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_readme_states_the_limits():
    text = " ".join((REPO / "README.md").read_text().split())
    assert MAX_FILE_BYTES == 2**20 and "at most 1 MiB" in text
    for phrase in (f"at most {MAX_YAML_NODES} values", f"nested at most {MAX_YAML_DEPTH} deep",
                   f"at most {MAX_TEMPLATE_OUTPUT} characters", f"at most {MAX_FORMAT_WIDTH}",
                   f"at most {MAX_TEMPLATE_INT_BITS} bits", f"at most {MAX_TEMPLATE_SECONDS:g} s"):
        assert phrase in text, phrase


# ---- 1. YAML ---------------------------------------------------------------------------------


def _alias_bomb() -> str:
    """The classic 'billion laughs': 10 levels of 9 aliases, 9**10 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_fails_fast_with_little_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = _alias_bomb()
    assert len(text) < 450
    write(tmp_path, "bomb.yaml", text)
    lines: list[str] = []
    start = time.monotonic()
    peak = _peak_mib(lambda: lines.append(_refused(capsys, "show", "bomb.yaml")))
    assert time.monotonic() - start < SECONDS
    assert peak < 256, f"peak {peak:.0f} MiB"
    assert lines[0].startswith("bomb.yaml:1:")
    assert f"more than the limit of {MAX_YAML_NODES} values" in lines[0]
    assert "alias" in lines[0]


def test_yaml_deep_nesting_is_located_not_a_recursion_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "deep.yaml", MINIMAL + "description: " + "[" * 10_000 + "]" * 10_000 + "\n")
    line = _refused(capsys, "show", "deep.yaml")
    # the 64th bracket opens at column 14 + 63
    assert line.startswith(f"deep.yaml:5:{14 + MAX_YAML_DEPTH - 1}: "), line
    assert f"nesting deeper than the limit of {MAX_YAML_DEPTH} levels" in line
    assert "RecursionError" not in line


def test_yaml_alias_to_itself_is_a_depth_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "self.yaml", MINIMAL + "description: &x [*x]\n")
    line = _refused(capsys, "show", "self.yaml")
    assert line.startswith("self.yaml:5:14: description: nesting deeper than the limit of 64 levels"), line


@pytest.mark.parametrize("raw, expected", [
    (MINIMAL.encode()[:-1] + b"\x00\n", "bad.yaml:4:14: invalid YAML: character #x0000 is not allowed"),
    (MINIMAL.encode() + b"description: \x07bell\n", "bad.yaml:5:14: invalid YAML: character #x0007 is not allowed"),
    (MINIMAL.encode() + b"description: caf\xe9\n", "bad.yaml:5:17: not UTF-8 text (byte 0xe9); save the recipe as UTF-8"),
])
def test_yaml_unreadable_characters_are_located(raw, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_bytes(raw)
    assert _refused(capsys, "show", "bad.yaml").startswith(expected)


def test_yaml_oversized_file_is_refused_before_parsing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "big.yaml", MINIMAL + "description: " + "x" * MAX_FILE_BYTES + "\n")
    line = _refused(capsys, "show", "big.yaml")
    assert line == f"big.yaml: the file is larger than the limit of {MAX_FILE_BYTES} bytes; a recipe is a small YAML file"


# ---- 2. Jinja --------------------------------------------------------------------------------

TEMPLATES = {
    "percent_format_filter": ("{{ '%0999999999d'|format(1) }}", f"format width 999999999 exceeds the limit of {MAX_FORMAT_WIDTH}"),
    "percent_operator": ("{{ '%.999999999f' % 1.5 }}", f"format width 999999999 exceeds the limit of {MAX_FORMAT_WIDTH}"),
    "str_format": ("{{ '{:>999999999}'.format(1) }}", f"format width 999999999 exceeds the limit of {MAX_FORMAT_WIDTH}"),
    "center": ("{{ 'x'|center(1000000000) }}", f"center width 1000000000 exceeds the limit of {MAX_FORMAT_WIDTH}"),
    "lipsum": ("{{ lipsum(100000) }}", "undefined variable 'lipsum'"),
    "string_repeat": ("{{ 'a' * 10**10 }}", f"repetition (* 10000000000) would exceed the limit of {MAX_TEMPLATE_OUTPUT}"),
    "list_repeat": ("{{ [1] * 10**9 }}", f"repetition (* 1000000000) would exceed the limit of {MAX_TEMPLATE_OUTPUT}"),
    "power": ("{{ 7 ** 1000000000 }}", f"** would give an integer larger than the limit of {MAX_TEMPLATE_INT_BITS} bits"),
    "range": ("{{ range(10**6) }}", "Range too big"),
    "doubling": ("{% set x = 'a' * 60000 %}{{ x ~ x }}", f"more than the limit of {MAX_TEMPLATE_OUTPUT} characters"),
    "output_size": ("{% for i in range(100000) %}0123456789{% endfor %}", f"more than the limit of {MAX_TEMPLATE_OUTPUT} characters"),
    "set_block": ("{% set x %}{% for i in range(100000) %}{{ 'a' * 60000 }}{% endfor %}{% endset %}{{ x|length }}",
                  f"more than the limit of {MAX_TEMPLATE_OUTPUT} characters"),
    "nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
                     "{% endfor %}{% endfor %}{% endfor %}", f"longer than the limit of {MAX_TEMPLATE_SECONDS:g} s"),
    "macro_fanout": ("{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(60) }}",
                     f"longer than the limit of {MAX_TEMPLATE_SECONDS:g} s"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_jinja_resource_abuse_is_refused_at_the_field(case, tmp_path, monkeypatch, capsys):
    template, expected = TEMPLATES[case]
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.yaml", MINIMAL.replace("path: model", f'path: "{template}"'))
    lines: list[str] = []
    peak = _peak_mib(lambda: lines.append(_refused(capsys, "show", "bad.yaml")))
    assert lines[0].startswith("bad.yaml:4:9: source.path: "), lines[0]
    assert expected in lines[0], lines[0]
    assert peak < 256, f"peak {peak:.0f} MiB"


def test_jinja_timeout_is_reported_once_for_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    write(tmp_path, "bad.yaml", MINIMAL + f'description: "{loop}"\noutput:\n  dir: "{loop}"\n')
    start = time.monotonic()
    line = _refused(capsys, "show", "bad.yaml")
    assert time.monotonic() - start < MAX_TEMPLATE_SECONDS + 3
    assert line.startswith("bad.yaml:5:14: description: template refused: rendering took longer than"), line


def test_jinja_ordinary_templates_still_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "ok.yaml", MINIMAL.replace("path: model", "path: \"{{ '%s-%03d'|format('m', tp) }}/{{ 'x' * 3 }}\"")
          + "vars: {tp: 4}\nmapping: {tp_size: \"{{ tp * 2 }}\"}\n"
          + "description: \"{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}{{ '{:>4}'.format(7) }}\"\n")
    code, out, err = run_cli(capsys, "show", "ok.yaml", "--format", "json")
    assert code == 0, err
    assert '"path":"m-004/xxx"' in out and '"tp_size":8' in out and '"description":"1/3 2/3 3/3    7"' in out


# ---- 3. numbers are finite -------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    ("quantization:\n  smoothquant_alpha: .nan\n", "bad.yaml:6:22: quantization.smoothquant_alpha: nan is not a finite number"),
    ("verify:\n  max_abs_logit_error: .inf\n", "bad.yaml:6:24: verify.max_abs_logit_error: inf is not a finite number"),
    ("verify:\n  mean_kl: -.Inf\n", "bad.yaml:6:12: verify.mean_kl: -inf is not a finite number"),
    ("vars: {x: .NaN}\n", "bad.yaml:5:11: vars.x: nan is not a finite number"),
    ("verify:\n  mean_kl: \"{{ '.inf' }}\"\n", "bad.yaml:6:12: verify.mean_kl: inf is not a finite number"),
])
def test_non_finite_numbers_are_refused(extra, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "bad.yaml", MINIMAL + extra)
    assert _refused(capsys, "show", "bad.yaml").startswith(expected)


# ---- 4. --set --------------------------------------------------------------------------------

VARS_RECIPE = MINIMAL.replace("path: model", 'path: "{{ models_dir }}/m"') + "vars: {models_dir: /models, tp: 1}\n"


@pytest.mark.parametrize("option, expected", [
    ("x=[1,", "error: --set x: the value is not valid YAML ("),
    ("x=: :", "error: --set x: the value is not valid YAML ("),
    ("tp=[1, 2]", "error: --set tp: the value must be a single string, number or true/false, not a YAML list; "
                  "to pass it as a string, quote it"),
    ("tp={a: 1}", "error: --set tp: the value must be a single string, number or true/false, not a YAML mapping"),
    ("tp=.nan", "error: --set tp: .nan is not a finite number"),
])
def test_set_values_must_be_yaml_scalars(option, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "r.yaml", VARS_RECIPE)
    assert _refused(capsys, "show", "r.yaml", "--set", option).startswith(expected)


def test_set_of_an_undeclared_variable_suggests_the_declared_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "r.yaml", VARS_RECIPE)
    line = _refused(capsys, "show", "r.yaml", "--set", "model_dir=/data")
    assert line == ("r.yaml:5:1: vars: --set model_dir: the recipe declares no variable 'model_dir' "
                    "(did you mean 'models_dir'? declared: models_dir, tp); declare it under `vars:` or fix the name")


def test_set_may_name_a_variable_declared_in_a_base(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "base.yaml", VARS_RECIPE)
    write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n")
    code, out, err = run_cli(capsys, "show", "child.yaml", "--format", "json", "--set", "models_dir=/data")
    assert code == 0, err
    assert '"path":"/data/m"' in out
    write(tmp_path, "bare.yaml", MINIMAL)
    assert "bare.yaml:1:1: vars: --set models_dir: the recipe declares no variable 'models_dir' (declared: none)" in \
        _refused(capsys, "show", "bare.yaml", "--set", "models_dir=/data")


# ---- 5. extends ------------------------------------------------------------------------------

SECRET = "s3cr3t-line-7f3a"


@pytest.mark.parametrize("name, content, reason", [
    ("passwd", f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1::/:/usr/sbin/nologin\n",
     "it does not parse as a YAML mapping"),
    ("settings.json", f'{{"password": "{SECRET}", "user": "admin"}}\n', "its top level has keys that no recipe has"),
    ("config.ini", f"[database]\npassword = {SECRET}\n", "it is not valid YAML (at config.ini:2:1)"),
    ("dupes.yaml", f"{SECRET}: 1\n{SECRET}: 2\n", "its top level has keys that no recipe has"),
    ("list.yaml", f"- {SECRET}\n", "it does not parse as a YAML mapping"),
    ("binary.bin", b"\x89PNG\r\n\x1a\n" + SECRET.encode() + b"\xff\xfe", "it is not UTF-8 text (at binary.bin:1:1)"),
])
def test_extends_of_a_foreign_file_never_quotes_it(name, content, reason, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / name
    base.write_bytes(content if isinstance(content, bytes) else content.encode())
    write(tmp_path, "child.yaml", f"extends: {name}\n" + MINIMAL)
    line = _refused(capsys, "show", "child.yaml")
    assert line == (f"child.yaml:1:10: extends: base recipe {name} is not a recipe file: {reason}; "
                    "`extends` must name a recipe (a YAML mapping of recipe keys)")
    assert SECRET not in line


def test_extends_etc_passwd_is_refused(tmp_path, monkeypatch, capsys):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd here")
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "child.yaml", "extends: /etc/passwd\n" + MINIMAL)
    line = _refused(capsys, "show", "child.yaml")
    assert line.startswith("child.yaml:1:10: extends: base recipe /etc/passwd is not a recipe file: ")
    assert "root" not in line


# ---- 6. diff --rev ---------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(cwd), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.mark.parametrize("rev", ["--output=victim.txt", "-ovictim.txt", "--remote=/nonexistent"])
def test_diff_rev_cannot_smuggle_git_options(rev, tmp_path, monkeypatch, capsys):
    write(tmp_path, "recipe.yaml", MINIMAL)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "recipe.yaml")
    _git(tmp_path, "commit", "-qm", "recipe")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, "diff", f"--rev={rev}", "recipe.yaml")
    assert line == f"error: --rev {rev!r} is not a git revision; give a commit, branch or tag (e.g. --rev HEAD~1)"
    assert victim.read_bytes() == b"precious\n"
    line = _refused(capsys, "diff", "--rev=no-such-branch", "recipe.yaml")
    assert line.startswith("error: --rev 'no-such-branch' names no commit in ")
    code, out, err = run_cli(capsys, "diff", "--rev=HEAD", "recipe.yaml")
    assert code == 0 and "no semantic change" in out, err
