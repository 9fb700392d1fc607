"""Every format citation resolves to a note the project ships.

A `§N` (or a range `§N–M`) must name its note within the same sentence: `docs/format/<note>.md §N`,
or a short form that the citing file defines in a legend line (`  trtllm-ckpt  docs/format/trtllm-checkpoint.md`,
as quant/algorithms.py does). The note must exist in docs/format/ and N (both ends of a range) must be one
of its numbered headings (`## 4.` for §4, `### 4.2` for §4.2). A bare `spec §4.2` fails, and so does a note
named without its docs/format/ path. Nothing in the package or the tests reaches for the research
workspace the notes were copied from, and the package reads docs/ at run time nowhere.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.recipe_files import REPO

FORMAT = REPO / "docs" / "format"
SELF = Path(__file__).resolve()
SCANNED = ("recipe_runner/**/*.py", "recipe_runner/**/*.md", "recipe_runner/**/*.j2", "recipe_runner/**/*.yaml",
           "tests/**/*.py", "bench/**/*.py", "scripts/**/*.py", "schema/**/*.json", "recipes/**/*.yaml",
           "README.md", "ARCHITECTURE.md")
WORKSPACE = "../" + "shared"  # spelled apart so this file does not match itself

SECTION = r"(\d+(?:\.\d+)*)"
CITATION = re.compile(rf"§\s?{SECTION}(?:\s*[–-]\s*§?{SECTION})?")
NOTE_NAME = re.compile(r"(?<![\w/.-])((?:docs/format/)?)([\w-]+\.md)\b")
LEGEND = re.compile(r"^[ \t#]*([a-z][\w-]*)[ \t]{2,}docs/format/([\w.-]+\.md)\b", re.MULTILINE)
# where a sentence (the citation's scope) starts: a full stop or semicolon, a blank (comment) line, a docstring quote
SENTENCE_START = re.compile(r"\.\s|;|\n[ \t#]*\n|\"\"\"")
SCOPE_LINES = 3  # a sentence may start at most this many lines above its citation
# words that may stand right before a § without being its note ("§1.3, §1.4 and §3")
JOINERS = {"and", "or", "to"}


def _line_start(text: str, pos: int, up: int) -> int:
    """Where the line `up` lines above the one holding `pos` starts."""
    start = text.rfind("\n", 0, pos) + 1
    for _ in range(up):
        start = text.rfind("\n", 0, max(start - 1, 0)) + 1 if start else 0
    return start


def headings(note: Path) -> set[str]:
    """The section numbers of a note's headings ("4" for "## 4. Quantized variants", "4.2" for "### 4.2 …")."""
    numbers, fenced = set(), False
    for line in note.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(rf"#{{1,6}}\s+{SECTION}\.?(?=\s|$)", line)):
            numbers.add(m.group(1))
    return numbers


NOTES = {p.name: headings(p) for p in sorted(FORMAT.glob("*.md")) if p.name != "README.md"}


def citation_problems(text: str, notes: dict[str, set[str]] = NOTES) -> tuple[list[str], int]:
    """(what is wrong with the citations in `text`, how many § citations it holds)."""
    problems = []
    aliases = {m.group(1): m.group(2) for m in LEGEND.finditer(text)}
    names = [(m.start(), m.end(), m.group(2) if m.group(1) else None, m.group(0)) for m in NOTE_NAME.finditer(text)]
    if aliases:
        alias = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, aliases)) + r")(?![\w-])")
        names += [(m.start(), m.end(), aliases[m.group(1)], m.group(0)) for m in alias.finditer(text)]
    names.sort()
    for start, _, note, written in names:
        bare = note is None and written in notes
        if bare or (note is not None and not (FORMAT / note).is_file()):
            line = text.count("\n", 0, start) + 1
            problems.append(f"line {line}: {written!r} " + ("without its docs/format/ path" if bare else
                                                            "is not a note in docs/format/"))
    cited = 0
    for m in CITATION.finditer(text):
        cited += 1
        line = text.count("\n", 0, m.start()) + 1
        where = f"line {line}: {text[m.start():m.end()]!r}"
        scope = max([_line_start(text, m.start(), SCOPE_LINES)]
                    + [s.end() for s in SENTENCE_START.finditer(text, 0, m.start())])
        before = [n for n in names if scope <= n[0] and n[1] <= m.start() and n[2] is not None]
        if not before:
            problems.append(f"{where} names no note of docs/format/ in its sentence")
            continue
        word = re.search(r"([\w./-]+)[ \t]+$", text[scope:m.start()])
        if word and word.group(1) not in JOINERS and not any(n[1] == scope + word.end(1) for n in before):
            problems.append(f"{where} follows {word.group(1)!r}, not the note it cites")
            continue
        note = before[-1][2]
        for number in filter(None, m.groups()):
            if number not in notes.get(note, ()):
                problems.append(f"{where}: {note} has no section {number}")
    return problems, cited


def _scanned() -> list[Path]:
    files = {p for pattern in SCANNED for p in REPO.glob(pattern) if p.is_file()}
    return sorted(p for p in files if p.resolve() != SELF and "__pycache__" not in p.parts)


def test_the_notes_are_shipped_with_their_sections():
    assert set(NOTES) == {"trtllm-checkpoint.md", "hf-quantized-checkpoint.md", "verified-layouts.md"}
    assert {"1", "2.4", "3.1", "4.2", "4.3", "4.6", "7"} <= NOTES["trtllm-checkpoint.md"]
    assert {"1.2", "1.3", "1.4", "2.1", "2.3", "3"} <= NOTES["hf-quantized-checkpoint.md"]
    index = (FORMAT / "README.md").read_text(encoding="utf-8")
    assert all(f"({name})" in index for name in NOTES)


def test_every_citation_names_a_shipped_note_and_an_existing_section():
    problems, cited = [], 0
    for path in _scanned():
        found, n = citation_problems(path.read_text(encoding="utf-8"))
        problems += [f"{path.relative_to(REPO)} {p}" for p in found]
        cited += n
    assert cited > 30, "the scan found almost no citations: it is broken"
    assert problems == []


def test_a_dangling_citation_fails():
    def problems(text: str) -> list[str]:
        return citation_problems(text)[0]

    fine = ("Facts from docs/format/hf-quantized-checkpoint.md §1.3, §1.4, §2.3 and §3, copied.\n"
            "# the fused qkv (docs/format/trtllm-checkpoint.md §3.1; docs/format/verified-layouts.md)\n"
            "facts from docs/format/trtllm-checkpoint.md\n§1–3, copied\n")
    assert problems(fine) == []
    legend = "Sources:\n  tc  docs/format/trtllm-checkpoint.md: §2.4 names, §4.3 KV\n\nSmoothQuant (tc §4.2).\n"
    assert problems(legend) == []
    assert problems("ModelOpt's shard size (spec §1.2)")  # the bare style
    assert problems("Fused names (docs/format/hf-quantized-checkpoint.md §2.1). The shard size, spec §1.2")
    assert problems("see docs/format/trtllm-checkpoint.md for splits, and spec §4.2 for SmoothQuant")
    assert problems("docs/format/trtllm-checkpoint.md §9.9")  # no such section
    assert problems("docs/format/trtllm-checkpoint.md §1–9")  # the range's end is missing
    assert problems("docs/format/nowhere.md §1")  # no such note
    assert problems("layout (verified-layouts.md)")  # named without its path
    assert problems(legend.replace("(tc §4.2)", "(tk §4.2)"))  # a short form no legend defines


def test_nothing_reaches_for_the_research_workspace():
    # tests/test_readme.py names it only to check that the README never does
    files = [p for top in ("recipe_runner", "tests") for p in (REPO / top).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p != REPO / "tests" / "test_readme.py"]
    assert len(files) > 50
    assert [p.relative_to(REPO) for p in files if WORKSPACE in p.read_text(encoding="utf-8", errors="ignore")] == []


def test_the_package_reads_no_docs_at_run_time():
    # docs/ is cited in comments and docstrings; no other string of the package (a path it could open) names it
    found = []
    for path in sorted((REPO / "recipe_runner").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{path.relative_to(REPO)}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and (node.value == "docs" or "docs/" in node.value)]
    assert found == []
