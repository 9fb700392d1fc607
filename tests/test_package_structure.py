"""The package reads top-down: no import cycles among recipe_runner's modules (imports at the top and
inside functions alike; those under `if TYPE_CHECKING:` never run), imports inside functions only with
a stated reason, and no module over ~400 lines."""
from __future__ import annotations

import ast
import graphlib
import io
import re
import tokenize
from pathlib import Path

import recipe_runner

PACKAGE = Path(recipe_runner.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["recipe_runner", *path.relative_to(PACKAGE).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` is, or the package that holds it (for `from pkg import Name`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(tree: ast.AST):
    """Every node but the bodies of `if TYPE_CHECKING:` blocks (type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {_owner(a.name, modules) for a in node.names if a.name.startswith("recipe_runner")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.startswith("recipe_runner"):
                found |= {_owner(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, modules)
                          for a in node.names}
    return found - {None, module}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert graph["recipe_runner.pipeline.plan"], "the import scan found nothing: it is broken"
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_no_module_is_over_400_lines():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


REASONS = ("warm", "cycle", "optional", "torch", "transformers", "safetensors", "tokenizers", "huggingface_hub",
           "jinja2", "jsonschema")
_REASON = re.compile(r"\b(" + "|".join(REASONS) + r")\b")


def _comments(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _in_function_import_runs(tree: ast.AST):
    """Each run of consecutive import statements inside a function body (or a block within one)."""
    def visit(node: ast.AST, in_function: bool):
        for name, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                run: list[ast.stmt] = []
                for stmt in [*value, None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        run.append(stmt)
                        continue
                    if run and in_function:
                        yield run
                    run = []
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from visit(tree, False)


def _imports_torch_at_top(tree: ast.Module) -> bool:
    return any(isinstance(s, ast.Import) and any(a.name.split(".")[0] == "torch" for a in s.names)
               or isinstance(s, ast.ImportFrom) and (s.module or "").split(".")[0] == "torch" for s in tree.body)


def test_every_import_inside_a_function_says_why():
    """Imports inside functions are only for keeping torch (or another heavy dependency) off the warm
    path, breaking an import cycle, or a dependency that may be missing, and each says which.

    The rule checked: every run of consecutive imports inside a function has a `#` comment on one of
    its lines, or on the two lines above it, naming a reason: `warm`, `cycle`, `optional`, or the heavy
    dependency it keeps off (torch, transformers, safetensors, tokenizers, huggingface_hub, jinja2,
    jsonschema); or else the module's docstring has a sentence with "inside functions" that names one
    (cli.py, whose many command imports share one reason). A module that imports torch at its top is
    never on the warm path, so there a reason other than `cycle` or `optional` is wrong.
    """
    unexplained, pointless, seen = [], [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        comments, name = _comments(source), path.relative_to(PACKAGE).as_posix()
        sentences = re.findall(r"[^.]*\binside functions\b[^.]*", ast.get_docstring(tree) or "")
        docstring_reason = next((m.group(1) for s in sentences if (m := _REASON.search(s))), None)
        heavy_at_top = _imports_torch_at_top(tree)
        for run in _in_function_import_runs(tree):
            seen += len(run)
            lines = range(run[0].lineno - 2, run[-1].end_lineno + 1)
            found = [m.group(1) for n in lines if n in comments and (m := _REASON.search(comments[n]))]
            reason = found[0] if found else docstring_reason
            if reason is None:
                unexplained.append(f"{name}:{run[0].lineno}")
            elif heavy_at_top and reason not in ("cycle", "optional"):
                pointless.append(f"{name}:{run[0].lineno} ({reason})")
    assert seen, "the scan found no import inside a function: it is broken"
    assert unexplained == [], "imports inside functions with no reason (move them to the top, or say why)"
    assert pointless == [], "this module imports torch at its top: these imports keep nothing off the warm path"
