#!/usr/bin/env python3
"""Record facts about one TensorRT-LLM release, read from its Python source with `ast`.

The source is never imported or executed: files are read with `git --git-dir X show
<commit>:<path>` (or from a directory of extracted files, --source-dir) and parsed. What is
recorded is what recipe-runner's checkpoint config.json and trtllm-build command line depend on:

  quant_config       QuantConfig fields (annotation, default) and what it does with unknown keys
  pretrained_config  PretrainedConfig.__init__ parameters, what it does with extra keyword
                     arguments, and how it builds `quantization` / `mapping` from config.json
  llama_config       LLaMAConfig.__init__ parameters
  quant_algos        QuantAlgo members; kv_cache_quant_algos: KV_CACHE_QUANT_ALGO_LIST
  mapping            Mapping.__init__ parameters and Mapping.from_dict
  trtllm_build_options  trtllm-build's argparse options: build.py parse_arguments() plus the
                     plugin options add_plugin_argument() generates from PluginConfig fields

Output: <out>/<release>.json (sorted keys, indent=1, trailing newline; the same commit always
gives the same bytes) and <out>/releases.json, the index of recorded releases in order.

  python scripts/trtllm_release_facts.py --git-dir MIRROR --tag v0.14.0 --release 0.14 \\
      --out recipe_runner/data/trtllm/
  python scripts/trtllm_release_facts.py --git-dir MIRROR --tag v0.14.0 --commit SHA ...
      (when the mirror lacks the tag itself; the tag is then a label)
  python scripts/trtllm_release_facts.py --git-dir MIRROR --all --out recipe_runner/data/trtllm/
      (every release in releases.json, plus every final vX.Y.0 tag >= v0.12.0 the mirror has)
  python scripts/trtllm_release_facts.py --source-dir DIR --tag v0.14.0 --commit SHA ...
  --check compares instead of writing (exit 1 on a difference).

Stdlib only. Anything the extractor cannot resolve statically is written as
"unresolved: <source text>"; a source shape it does not know stops it with an error naming
the file and line, so a new release never yields silently wrong facts.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
FIRST_RELEASE = (0, 12)

# Where each class is looked for first; imports are followed from there if it moved.
START = {
    "QuantConfig": "tensorrt_llm/models/modeling_utils.py",
    "PretrainedConfig": "tensorrt_llm/models/modeling_utils.py",
    "LLaMAConfig": "tensorrt_llm/models/llama/config.py",
    "QuantAlgo": "tensorrt_llm/quantization/mode.py",
    "Mapping": "tensorrt_llm/mapping.py",
}
BUILD_PY = "tensorrt_llm/commands/build.py"
VERSION_PY = "tensorrt_llm/version.py"


class FactsError(Exception):
    pass


# ---------------------------------------------------------------------------- sources


class Source:
    """Files of one source tree; remembers each file read (for provenance)."""

    def __init__(self) -> None:
        self.read_files: dict[str, str] = {}  # path -> git blob sha1

    def _raw(self, path: str) -> bytes | None:
        raise NotImplementedError

    def read(self, path: str) -> str | None:
        data = self._raw(path)
        if data is None:
            return None
        self.read_files[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return data.decode("utf-8")


class GitSource(Source):
    def __init__(self, git_dir: str, commit: str) -> None:
        super().__init__()
        self.git_dir, self.commit = git_dir, commit

    def _raw(self, path: str) -> bytes | None:
        proc = subprocess.run(["git", "--git-dir", self.git_dir, "show", f"{self.commit}:{path}"],
                              capture_output=True)
        return proc.stdout if proc.returncode == 0 else None


class DirSource(Source):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = Path(root)

    def _raw(self, path: str) -> bytes | None:
        p = self.root / path
        return p.read_bytes() if p.is_file() else None


def git(git_dir: str, *args: str) -> str:
    proc = subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FactsError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


# ---------------------------------------------------------------------------- modules


class Unresolved(Exception):
    pass


@dataclass
class Module:
    path: str
    tree: ast.Module
    text: str
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (module, attr)
    assigns: dict[str, ast.AST] = field(default_factory=dict)  # module-level NAME = value
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)


def text_of(node: ast.AST | None) -> str | None:
    return None if node is None else ast.unparse(node)


def where(mod: Module, node: ast.AST) -> str:
    return f"{mod.path}:{node.lineno}"


class Tree:
    """The source tree as parsed modules, with name resolution across imports."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._modules: dict[str, Module | None] = {}

    def module(self, path: str) -> Module | None:
        if path not in self._modules:
            text = self.source.read(path)
            if text is None:
                self._modules[path] = None
            else:
                with warnings.catch_warnings():  # e.g. invalid escapes in their strings
                    warnings.simplefilter("ignore", SyntaxWarning)
                    tree = ast.parse(text, filename=path)
                mod = Module(path, tree, text)
                for stmt in tree.body:
                    self._index(mod, stmt)
                self._modules[path] = mod
        return self._modules[path]

    def _index(self, mod: Module, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.ImportFrom):
            base = self._absolute(mod.path, stmt.module, stmt.level)
            for alias in stmt.names:
                mod.imports[alias.asname or alias.name] = (base, alias.name)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                mod.imports[alias.asname or alias.name.split(".")[0]] = (alias.name, "")
        elif isinstance(stmt, ast.ClassDef):
            mod.classes[stmt.name] = stmt
        elif isinstance(stmt, ast.FunctionDef):
            mod.functions[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    mod.assigns[target.id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
            mod.assigns[stmt.target.id] = stmt.value
        elif isinstance(stmt, ast.Try):  # try: from x import y / except ImportError: ...
            for inner in stmt.body:
                self._index(mod, inner)

    @staticmethod
    def _absolute(path: str, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        package = path[:-len(".py")].split("/")
        package = package[:-1]  # the module's package (for __init__.py: the package itself)
        if level > 1:
            package = package[:-(level - 1)]
        return ".".join(package + ([module] if module else []))

    def module_of(self, dotted: str) -> Module | None:
        base = dotted.replace(".", "/")
        return self.module(base + ".py") or self.module(base + "/__init__.py")

    def find_class(self, name: str, start: str, depth: int = 0) -> tuple[Module, ast.ClassDef]:
        """The module defining class `name`, following imports from module file `start`."""
        mod = self.module(start)
        if mod is None:
            raise FactsError(f"{start}: not in this source tree (looking for class {name})")
        if name in mod.classes:
            return mod, mod.classes[name]
        if name in mod.imports and depth < 8:
            dotted, attr = mod.imports[name]
            target = self.module_of(dotted)
            if target is not None:
                return self.find_class(attr or name, target.path, depth + 1)
        raise FactsError(f"{start}: class {name} is neither defined nor imported from a file here")

    def lookup(self, mod: Module, name: str, depth: int = 0) -> tuple[Module, ast.AST, str]:
        """(module, node, kind) for a module-level name: kind is 'class', 'function' or 'value'."""
        if name in mod.classes:
            return mod, mod.classes[name], "class"
        if name in mod.functions:
            return mod, mod.functions[name], "function"
        if name in mod.assigns:
            return mod, mod.assigns[name], "value"
        if name in mod.imports and depth < 8:
            dotted, attr = mod.imports[name]
            target = self.module_of(dotted) if attr else None
            if target is not None:
                return self.lookup(target, attr, depth + 1)
        raise Unresolved(name)

    # --- static evaluation -------------------------------------------------------------

    def value(self, mod: Module, node: ast.AST, env: dict[str, Any] | None = None) -> Any:
        """The value of a constant expression: literals, module constants, class attribute
        defaults (dataclass fields), dict .keys(); raises Unresolved otherwise."""
        env = env or {}
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.value(mod, e, env) for e in node.elts]
            return items
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise Unresolved(text_of(node))
            keys = [self.value(mod, k, env) for k in node.keys]
            values = [self._maybe(mod, v, env) for v in node.values]
            return dict(zip(keys, values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.value(mod, node.operand, env)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.value(mod, node.left, env) + self.value(mod, node.right, env)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for part in node.values:
                if isinstance(part, ast.FormattedValue):
                    parts.append(str(self.value(mod, part.value, env)))
                else:
                    parts.append(part.value)
            return "".join(parts)
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            owner, target, kind = self.lookup(mod, node.id)
            if kind != "value":
                raise Unresolved(node.id)
            return self.value(owner, target)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in env:
                obj = env[node.value.id]
                if isinstance(obj, dict) and node.attr in obj:
                    return obj[node.attr]
                raise Unresolved(text_of(node))
            owner, target, kind = self.lookup(mod, node.value.id)
            if kind == "class":
                return self.class_attribute(owner, target, node.attr)
            raise Unresolved(text_of(node))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            # Class.Inner.ATTR (e.g. LoraManager.LORA_MODULE_IDS)
            inner = node.value
            if isinstance(inner.value, ast.Name):
                owner, target, kind = self.lookup(mod, inner.value.id)
                if kind == "class":
                    attr_node = self.class_attribute_node(target, inner.attr)
                    if isinstance(attr_node, ast.ClassDef):
                        return self.class_attribute(owner, attr_node, node.attr)
            raise Unresolved(text_of(node))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "keys" and not node.args):
            base = node.func.value
            dict_node = self._dict_node(mod, base)
            return [self.value(mod, k) for k in dict_node.keys]
        raise Unresolved(text_of(node))

    def _maybe(self, mod: Module, node: ast.AST, env: dict[str, Any]) -> Any:
        try:
            return self.value(mod, node, env)
        except Unresolved:
            return "unresolved: " + text_of(node)

    def _dict_node(self, mod: Module, node: ast.AST) -> ast.Dict:
        """The dict literal a name / Class.ATTR refers to (its keys are evaluated)."""
        if isinstance(node, ast.Name):
            owner, target, kind = self.lookup(mod, node.id)
            if kind == "value" and isinstance(target, ast.Dict):
                return target
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner, target, kind = self.lookup(mod, node.value.id)
            if kind == "class":
                attr = self.class_attribute_node(target, node.attr)
                if isinstance(attr, ast.Dict):
                    return attr
        raise Unresolved(text_of(node))

    @staticmethod
    def class_attribute_node(cls: ast.ClassDef, name: str) -> ast.AST | None:
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and stmt.target.id == name:
                return stmt.value
            if isinstance(stmt, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                return stmt.value
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return stmt
        return None

    def class_attribute(self, mod: Module, cls: ast.ClassDef, name: str) -> Any:
        node = self.class_attribute_node(cls, name)
        if node is None:
            raise Unresolved(f"{cls.name}.{name}")
        default = field_default(node)
        if default is None:
            raise Unresolved(f"{cls.name}.{name} = {text_of(node)}")
        return self.value(mod, default)


def field_default(node: ast.AST | None) -> ast.AST | None:
    """The default expression of a dataclass field: `x: T = D` or `x: T = field(default=D)`;
    None when there is none (no value, or default_factory)."""
    if node is None:
        return None
    if isinstance(node, ast.Call) and call_name(node) in ("field", "dataclasses.field"):
        for kw in node.keywords:
            if kw.arg == "default":
                return kw.value
        return None
    return node


def call_name(node: ast.Call) -> str:
    return text_of(node.func) or ""


def keyword(node: ast.Call, name: str) -> ast.AST | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    for stmt in cls.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == name:
            return stmt
    return None


def is_dataclass(cls: ast.ClassDef) -> bool:
    for dec in cls.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if text_of(target) in ("dataclass", "dataclasses.dataclass"):
            return True
    return False


def literal(node: ast.AST | None) -> tuple[bool, Any]:
    if node is None:
        return False, None
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return False, None
    json.dumps(value)  # only JSON-able literals
    return True, value


# ---------------------------------------------------------------------------- sections


def parameters(fn: ast.FunctionDef, skip_self: bool = True) -> list[dict[str, Any]]:
    args = fn.args
    out: list[dict[str, Any]] = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if skip_self and i == 0 and arg.arg in ("self", "cls"):
            continue
        out.append(_param(arg, default, "positional_or_keyword"))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append(_param(arg, default, "keyword_only"))
    return out


def _param(arg: ast.arg, default: ast.AST | None, kind: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": arg.arg, "kind": kind, "annotation": text_of(arg.annotation),
                             "required": default is None, "default": text_of(default)}
    ok, value = literal(default)
    if ok:
        entry["default_value"] = value
    return entry


def dataclass_fields(cls: ast.ClassDef) -> list[dict[str, Any]]:
    out = []
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if text_of(stmt.annotation).startswith("ClassVar"):
                continue
            default = field_default(stmt.value)
            entry: dict[str, Any] = {"name": stmt.target.id, "annotation": text_of(stmt.annotation),
                                     "default": text_of(default), "line": stmt.lineno}
            if stmt.value is not None and default is None:
                entry["default"] = "factory: " + text_of(stmt.value)
            ok, value = literal(default)
            if ok:
                entry["default_value"] = value
            entry["required"] = stmt.value is None
            out.append(entry)
    return out


def kwargs_treatment(mod: Module, fn: ast.FunctionDef, label: str) -> dict[str, Any]:
    """What __init__ does with **kwargs: kept (setattr on self / passed to super().__init__),
    ignored (only logged or nothing), or error (no **kwargs: TypeError on unknown keywords)."""
    kw = fn.args.kwarg
    if kw is None:
        return {"unknown_keys": "error",
                "evidence": f"{label}({', '.join(a.arg for a in fn.args.args[1:] + fn.args.kwonlyargs)})"
                            f" has no **kwargs: an unknown keyword raises TypeError",
                "line": fn.lineno, "path": mod.path}
    name = kw.arg
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and call_name(node) == "setattr" and len(node.args) >= 2:
            if text_of(node.args[0]) == "self":
                loops = [n for n in ast.walk(fn) if isinstance(n, ast.For)
                         and name in text_of(n.iter) and node in list(ast.walk(n))]
                if loops:
                    return {"unknown_keys": "kept",
                            "evidence": f"{label}: for {text_of(loops[0].target)} in "
                                        f"{text_of(loops[0].iter)}: setattr(self, ...)",
                            "line": loops[0].lineno, "path": mod.path}
        if isinstance(node, ast.Call) and call_name(node).endswith("__init__") and any(
                isinstance(k, ast.keyword) and k.arg is None and text_of(k.value) == name
                for k in node.keywords):
            return {"unknown_keys": "passed_on",
                    "evidence": f"{label}: {text_of(node)}", "line": node.lineno, "path": mod.path}
    return {"unknown_keys": "ignored", "evidence": f"{label} takes **{name} and does not store it",
            "line": fn.lineno, "path": mod.path}


def quant_config_section(tree: Tree) -> dict[str, Any]:
    mod, cls = tree.find_class("QuantConfig", START["QuantConfig"])
    out: dict[str, Any] = {"path": mod.path, "class_line": cls.lineno, "dataclass": is_dataclass(cls),
                           "bases": [text_of(b) for b in cls.bases]}
    init = method(cls, "__init__")
    if is_dataclass(cls) and init is None:
        out["fields"] = dataclass_fields(cls)
        init_behaviour = {"unknown_keys": "error",
                          "evidence": "@dataclass-generated __init__ (no **kwargs): an unknown "
                                      "keyword raises TypeError: QuantConfig.__init__() got an "
                                      "unexpected keyword argument",
                          "line": cls.lineno, "path": mod.path}
    elif init is not None:
        out["fields"] = [dict(p, line=init.lineno) for p in parameters(init)]
        init_behaviour = kwargs_treatment(mod, init, "QuantConfig.__init__")
    else:
        raise FactsError(f"{where(mod, cls)}: QuantConfig is neither a dataclass nor has __init__")
    out["init"] = init_behaviour
    from_dict = method(cls, "from_dict")
    if from_dict is None:
        out["from_dict"] = None
        out["unknown_keys"] = init_behaviour["unknown_keys"]
        out["unknown_keys_evidence"] = init_behaviour
        return out
    out["from_dict"] = _from_dict_behaviour(mod, from_dict, init_behaviour, "QuantConfig.from_dict")
    out["unknown_keys"] = out["from_dict"]["unknown_keys"]
    return out


def _from_dict_behaviour(mod: Module, fn: ast.FunctionDef, init: dict[str, Any],
                         label: str) -> dict[str, Any]:
    param = fn.args.args[1].arg if len(fn.args.args) > 1 else None
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and text_of(node.func) in ("cls", "QuantConfig"):
            star = [k.value for k in node.keywords if k.arg is None]
            if not star:
                continue
            arg = star[0]
            if isinstance(arg, ast.Name) and arg.id == param:
                return {"unknown_keys": init["unknown_keys"],
                        "evidence": f"{label}: {text_of(node)} passes every key to __init__",
                        "line": node.lineno, "path": mod.path}
            if isinstance(arg, ast.DictComp) and any(c.ifs for c in arg.generators):
                return {"unknown_keys": "ignored",
                        "evidence": f"{label}: {text_of(node)} keeps only known keys",
                        "line": node.lineno, "path": mod.path}
            if isinstance(arg, ast.Name):  # a local filtered dict
                for assign in ast.walk(fn):
                    if isinstance(assign, ast.Assign) and any(
                            text_of(t) == arg.id for t in assign.targets):
                        if isinstance(assign.value, ast.DictComp) and any(
                                c.ifs for c in assign.value.generators):
                            return {"unknown_keys": "ignored",
                                    "evidence": f"{label}: {arg.id} = {text_of(assign.value)}; "
                                                f"{text_of(node)}",
                                    "line": assign.lineno, "path": mod.path}
    raise FactsError(f"{where(mod, fn)}: {label}: unknown shape, extend the generator")


def _call_sites(fn: ast.FunctionDef, pattern: str) -> list[ast.Call]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and re.fullmatch(pattern, call_name(n))]


def _class_init(tree: Tree, name: str):
    """(module, class, __init__) of class `name`; FactsError when it has no __init__."""
    mod, cls = tree.find_class(name, START[name])
    init = method(cls, "__init__")
    if init is None:
        raise FactsError(f"{where(mod, cls)}: {name} without __init__")
    return mod, cls, init


def pretrained_config_section(tree: Tree) -> dict[str, Any]:
    mod, cls, init = _class_init(tree, "PretrainedConfig")
    out: dict[str, Any] = {"path": mod.path, "class_line": cls.lineno, "parameters": parameters(init),
                           "extra_kwargs": kwargs_treatment(mod, init, "PretrainedConfig.__init__")}
    for key, cls_name in (("quantization_from", "QuantConfig"), ("mapping_from", "Mapping")):
        calls = _call_sites(init, rf"{cls_name}(\.\w+)?")
        out[key] = [{"call": text_of(c), "line": c.lineno} for c in calls]
    for name in ("from_dict", "from_json_file", "from_checkpoint"):
        fn = method(cls, name)
        if fn is None:
            out[name] = None
            continue
        calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
                 and (any(k.arg is None for k in n.keywords) or "from_" in call_name(n))]
        out[name] = {"line": fn.lineno,
                     "calls": [{"call": text_of(c), "line": c.lineno} for c in calls]}
    return out


def llama_config_section(tree: Tree) -> dict[str, Any]:
    mod, cls = tree.find_class("LLaMAConfig", START["LLaMAConfig"])
    init = method(cls, "__init__")
    if init is None:
        raise FactsError(f"{where(mod, cls)}: LLaMAConfig without __init__")
    kw = init.args.kwarg.arg if init.args.kwarg else None
    popped = []
    for node in ast.walk(init):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and text_of(node.func.value) == kw and node.func.attr in ("pop", "get") and node.args:
            ok, key = literal(node.args[0])
            if ok:
                popped.append({"key": key, "how": node.func.attr, "line": node.lineno})
    return {"path": mod.path, "class_line": cls.lineno, "bases": [text_of(b) for b in cls.bases],
            "parameters": parameters(init),
            "extra_kwargs": kwargs_treatment(mod, init, "LLaMAConfig.__init__"),
            "kwargs_read": popped}


def quant_algo_section(tree: Tree) -> tuple[list[str], list[str], dict[str, Any]]:
    mod, cls = tree.find_class("QuantAlgo", START["QuantAlgo"])
    members: list[str] = []
    values: dict[str, Any] = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            members.append(name)
            if isinstance(stmt.value, ast.Call) and call_name(stmt.value) in ("auto", "enum.auto"):
                values[name] = name  # strenum.StrEnum: auto() is the member's name
            else:
                ok, value = literal(stmt.value)
                values[name] = value if ok else "unresolved: " + text_of(stmt.value)
    kv_node = mod.assigns.get("KV_CACHE_QUANT_ALGO_LIST")
    if kv_node is None or not isinstance(kv_node, (ast.List, ast.Tuple, ast.Set)):
        raise FactsError(f"{mod.path}: no KV_CACHE_QUANT_ALGO_LIST list")
    kv = []
    for elt in kv_node.elts:
        if not (isinstance(elt, ast.Attribute) and text_of(elt.value) == "QuantAlgo"):
            raise FactsError(f"{where(mod, elt)}: KV_CACHE_QUANT_ALGO_LIST entry {text_of(elt)}")
        kv.append(elt.attr)
    bases = [text_of(b) for b in cls.bases]
    source = {"path": mod.path, "class_line": cls.lineno, "bases": bases,
              "values": values,
              "kv_cache_list_line": next(s.lineno for s in mod.tree.body if isinstance(s, ast.Assign)
                                         and any(text_of(t) == "KV_CACHE_QUANT_ALGO_LIST"
                                                 for t in s.targets)),
              "quant_algo_list": text_of(mod.assigns.get("QUANT_ALGO_LIST"))}
    return members, kv, source


def mapping_section(tree: Tree) -> dict[str, Any]:
    mod, cls, init = _class_init(tree, "Mapping")
    out: dict[str, Any] = {"path": mod.path, "class_line": cls.lineno, "parameters": parameters(init),
                           "init": kwargs_treatment(mod, init, "Mapping.__init__")}
    from_dict = method(cls, "from_dict")
    out["from_dict"] = None if from_dict is None else _from_dict_behaviour(
        mod, from_dict, out["init"], "Mapping.from_dict")
    out["unknown_keys"] = (out["from_dict"] or out["init"])["unknown_keys"]
    to_dict = method(cls, "to_dict")
    keys = []
    if to_dict is not None:
        for node in ast.walk(to_dict):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                keys = [literal(k)[1] for k in node.value.keys if k is not None]
    out["to_dict_keys"] = keys
    return out


# ---------------------------------------------------------------------------- trtllm-build

_SUPPRESS = "argparse.SUPPRESS"


def _group_slug(title: str) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", title.lower()).split()
    words = [w for w in words if w not in ("arguments", "config", "decoding")]
    return "_".join(words) or "general"


def _dest(flags: list[str], dest: str | None) -> str:
    if dest:
        return dest
    long = next((f for f in flags if f.startswith("--")), flags[0])
    return long.lstrip("-").replace("-", "_")


class BuildOptions:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.options: list[dict[str, Any]] = []

    def kw_value(self, mod: Module, node: ast.AST | None, env: dict[str, Any] | None = None,
                 what: str = "value") -> Any:
        if node is None:
            return None
        if text_of(node) == _SUPPRESS:
            return _SUPPRESS
        try:
            value = self.tree.value(mod, node, env)
        except Unresolved:
            return "unresolved: " + text_of(node)
        json.dumps(value)
        return value

    def add(self, mod: Module, call: ast.Call, group: str, env: dict[str, Any] | None = None,
            origin: str | None = None) -> None:
        flags = [self.tree.value(mod, a, env) for a in call.args]
        if not flags or not all(isinstance(f, str) for f in flags):
            raise FactsError(f"{where(mod, call)}: add_argument flags {text_of(call)}")
        kws = {k.arg: k.value for k in call.keywords}
        unknown = set(kws) - {"type", "default", "choices", "help", "action", "nargs", "dest",
                              "required", "metavar"}
        if None in kws or unknown:
            raise FactsError(f"{where(mod, call)}: add_argument keywords {sorted(map(str, unknown))}")
        type_node = kws.get("type")
        if type_node is None:
            type_text = None
        elif env and isinstance(type_node, ast.Attribute) and text_of(type_node.value) in env:
            type_text = self.kw_value(mod, type_node, env)
        else:
            type_text = text_of(type_node)
        choices = self.kw_value(mod, kws.get("choices"), env)
        option = {
            "flag": flags[0], "aliases": flags[1:],
            "dest": _dest(flags, self.kw_value(mod, kws.get("dest"), env)),
            "type": type_text,
            "default": self.kw_value(mod, kws.get("default"), env),
            "choices": choices,
            "nargs": self.kw_value(mod, kws.get("nargs"), env),
            "action": self.kw_value(mod, kws.get("action"), env),
            "group": group,
            "help": self.kw_value(mod, kws.get("help"), env),
            "source": origin or where(mod, call),
        }
        if "required" in kws:
            option["required"] = self.kw_value(mod, kws["required"], env)
        self.options.append(option)

    def parse_arguments(self) -> dict[str, Any]:
        mod = self.tree.module(BUILD_PY)
        if mod is None or "parse_arguments" not in mod.functions:
            raise FactsError(f"{BUILD_PY}: no parse_arguments()")
        fn = mod.functions["parse_arguments"]
        groups: dict[str, str] = {}
        parser_name = None
        plugin_info = None
        for stmt in fn.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
                name = call_name(stmt.value)
                target = text_of(stmt.targets[0])
                if name.endswith("ArgumentParser"):
                    parser_name = target
                    groups[target] = "general"
                elif name.endswith(".add_argument_group"):
                    title = self.tree.value(mod, stmt.value.args[0]) if stmt.value.args else "general"
                    groups[target] = _group_slug(title)
                continue
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                call = stmt.value
                name = call_name(call)
                if name.endswith(".add_argument"):
                    owner = text_of(call.func.value)
                    if owner not in groups:
                        raise FactsError(f"{where(mod, call)}: add_argument on unknown parser {owner}")
                    self.add(mod, call, groups[owner])
                    continue
                if name == "add_plugin_argument":
                    owner = text_of(call.args[0])
                    plugin_info = self.plugin_arguments(mod, "add_plugin_argument", groups.get(owner, "plugin"))
                    continue
            if any(isinstance(n, ast.Call) and call_name(n).endswith(("add_argument", "add_argument_group",
                                                                       "add_plugin_argument"))
                   for n in ast.walk(stmt)):
                raise FactsError(f"{where(mod, stmt)}: option added inside a statement the generator "
                                 f"does not follow ({type(stmt).__name__})")
        if parser_name is None:
            raise FactsError(f"{where(mod, fn)}: parse_arguments() builds no ArgumentParser")
        return {"path": mod.path, "function_line": fn.lineno, "plugin": plugin_info}

    # --- add_plugin_argument, interpreted over PluginConfig's fields -------------------

    def plugin_arguments(self, build_mod: Module, name: str, group: str) -> dict[str, Any]:
        mod, fn, kind = self.tree.lookup(build_mod, name)
        if kind != "function":
            raise FactsError(f"{BUILD_PY}: {name} is not a function")
        loops = [s for s in fn.body if isinstance(s, ast.For)]
        if len(loops) != 1 or not isinstance(loops[0].iter, ast.Call) \
                or call_name(loops[0].iter) != "fields":
            raise FactsError(f"{where(mod, fn)}: {name}: expected one `for field in fields(...)` loop")
        loop = loops[0]
        cls_mod, cls = self.tree.find_class("PluginConfig", mod.path)
        fields_ = [s for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        var = text_of(loop.target)
        for stmt in fields_:
            value = stmt.value
            default_node = field_default(value)
            metadata: dict[str, Any] = {}
            meta_node = keyword(value, "metadata") if isinstance(value, ast.Call) else None
            if meta_node is not None:
                metadata = self.tree.value(cls_mod, meta_node)
            default = self.tree.value(cls_mod, default_node) if default_node is not None else None
            field_env = {"name": stmt.target.id, "type": _TypeText(text_of(stmt.annotation)),
                         "default": default, "metadata": metadata}
            env = {var: field_env}
            origin = f"{cls_mod.path}:{stmt.lineno} (PluginConfig.{stmt.target.id}) via {mod.path}:{fn.lineno}"
            self._run(mod, loop.body, env, group, origin)
        return {"path": mod.path, "function_line": fn.lineno, "plugin_config_path": cls_mod.path,
                "plugin_config_line": cls.lineno}

    def _run(self, mod: Module, body: list[ast.stmt], env: dict[str, Any], group: str, origin: str) -> str | None:
        for stmt in body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                env[stmt.targets[0].id] = self._eval(mod, stmt.value, env)
            elif isinstance(stmt, ast.If):
                branch = stmt.body if self._eval(mod, stmt.test, env) else stmt.orelse
                result = self._run(mod, branch, env, group, origin)
                if result:
                    return result
            elif isinstance(stmt, ast.Continue):
                return "continue"
            elif isinstance(stmt, ast.Raise):
                raise FactsError(f"{where(mod, stmt)}: add_plugin_argument raises for {env}")
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) \
                    and call_name(stmt.value).endswith(".add_argument"):
                self._add_evaluated(mod, stmt.value, env, group, origin)
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                pass
            else:
                raise FactsError(f"{where(mod, stmt)}: add_plugin_argument statement the generator "
                                 f"does not follow: {text_of(stmt)[:80]}")
        return None

    def _add_evaluated(self, mod: Module, call: ast.Call, env: dict[str, Any], group: str, origin: str) -> None:
        flags = [self._eval(mod, a, env) for a in call.args]
        kws = {k.arg: k.value for k in call.keywords}
        if None in kws:
            raise FactsError(f"{where(mod, call)}: **kwargs in add_argument")
        values = {k: self._eval(mod, v, env) for k, v in kws.items() if k != "type"}
        type_node = kws.get("type")
        type_value = None if type_node is None else self._eval(mod, type_node, env)
        option = {
            "flag": flags[0], "aliases": flags[1:],
            "dest": _dest(flags, values.get("dest")),
            "type": str(type_value) if type_value is not None else None,
            "default": values.get("default"),
            "choices": values.get("choices"),
            "nargs": values.get("nargs"),
            "action": values.get("action"),
            "group": group,
            "help": values.get("help"),
            "source": origin,
        }
        json.dumps(option)
        self.options.append(option)

    def _eval(self, mod: Module, node: ast.AST, env: dict[str, Any]) -> Any:
        """A small evaluator for the expressions add_plugin_argument uses."""
        ev = lambda n: self._eval(mod, n, env)  # noqa: E731
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in ("str", "bool", "int", "float"):
                return _TypeText(node.id)
            return self.tree.value(mod, node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in env:
            obj = env[node.value.id]
            if isinstance(obj, dict) and node.attr in obj:
                return obj[node.attr]
            raise FactsError(f"{where(mod, node)}: {text_of(node)} not known to the evaluator")
        if isinstance(node, ast.Subscript):
            if text_of(node.value) in ("Optional", "List", "typing.Optional"):
                return _TypeText(text_of(node))
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, (ast.Tuple, ast.List)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            if isinstance(node.op, ast.And):
                result = True
                for v in values:
                    result = v
                    if not v:
                        return v
                return result
            for v in values:
                if v:
                    return v
            return values[-1]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return ev(node.left) + ev(node.right)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            left, right, op = ev(node.left), ev(node.comparators[0]), node.ops[0]
            if isinstance(op, ast.Eq):
                return left == right
            if isinstance(op, ast.NotEq):
                return left != right
            if isinstance(op, ast.In):
                return left in right
            if isinstance(op, ast.NotIn):
                return left not in right
            if isinstance(op, ast.Is):
                return left is right
            if isinstance(op, ast.IsNot):
                return left is not right
        if isinstance(node, ast.ListComp) and len(node.generators) == 1:
            gen = node.generators[0]
            out = []
            for item in ev(gen.iter):
                inner = dict(env)
                inner[text_of(gen.target)] = item
                if all(self._eval(mod, cond, inner) for cond in gen.ifs):
                    out.append(self._eval(mod, node.elt, inner))
            return out
        if isinstance(node, ast.JoinedStr):
            return "".join(str(ev(p.value)) if isinstance(p, ast.FormattedValue) else p.value
                           for p in node.values)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("lstrip", "rstrip", "strip", "lower", "upper", "replace"):
            target = ev(node.func.value)
            return getattr(target, node.func.attr)(*[ev(a) for a in node.args])
        raise FactsError(f"{where(mod, node)}: expression the generator does not follow: {text_of(node)}")


class _TypeText(str):
    """An annotation as text; compares equal to the same annotation text."""


# ---------------------------------------------------------------------------- release


def extract(source: Source) -> dict[str, Any]:
    tree = Tree(source)
    build = BuildOptions(tree)
    build_info = build.parse_arguments()
    algos, kv_algos, algo_source = quant_algo_section(tree)
    version_mod = tree.module(VERSION_PY)
    version = None
    if version_mod is not None and "__version__" in version_mod.assigns:
        version = literal(version_mod.assigns["__version__"])[1]
    facts = {
        "version": version,
        "quant_config": quant_config_section(tree),
        "pretrained_config": pretrained_config_section(tree),
        "llama_config": llama_config_section(tree),
        "quant_algos": algos,
        "kv_cache_quant_algos": kv_algos,
        "quant_algos_source": algo_source,
        "mapping": mapping_section(tree),
        "trtllm_build_options": build.options,
        "trtllm_build_source": build_info,
    }
    flags = [o["flag"] for o in build.options]
    dupes = sorted({f for f in flags if flags.count(f) > 1})
    if dupes:
        raise FactsError(f"trtllm-build flags recorded twice: {dupes}")
    facts["files_read"] = dict(sorted(source.read_files.items()))
    return facts


def version_key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", release))


def release_of_tag(tag: str) -> str:
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+(\.post\d+)?", tag)
    if not match:
        raise FactsError(f"cannot derive a release from tag {tag!r}; pass --release")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def release_document(source: Source, release: str, tag: str, commit: str, source_repo: str,
                     note: str | None) -> dict[str, Any]:
    facts = extract(source)
    expected = tag.lstrip("v")
    if facts["version"] is not None and not str(facts["version"]).startswith(expected.split(".post")[0]):
        raise FactsError(f"{VERSION_PY} says {facts['version']!r}, not {expected!r} (tag {tag}, commit {commit})")
    doc = {"schema": SCHEMA, "release": release, "tag": tag, "commit": commit,
           "source_repo": source_repo, "generator": "scripts/trtllm_release_facts.py"}
    if note:
        doc["commit_note"] = note
    doc.update(facts)
    return doc


def write_or_check(path: Path, text: str, check: bool) -> bool:
    if check:
        same = path.is_file() and path.read_text("utf-8") == text
        print(f"{'same' if same else 'DIFFERS'}: {path}")
        return same
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    print(f"wrote {path}")
    return True


def load_index(out: Path) -> list[dict[str, Any]]:
    index = out / "releases.json"
    if not index.is_file():
        return []
    return json.loads(index.read_text("utf-8"))["releases"]


def index_text(entries: list[dict[str, Any]]) -> str:
    entries = sorted(entries, key=lambda e: version_key(e["release"]))
    return dumps({"about": "TensorRT-LLM releases recorded by scripts/trtllm_release_facts.py, "
                           "oldest first; one <release>.json each", "releases": entries})


def repo_from_git_dir(git_dir: str) -> str | None:
    # /work/.mirror/owner+name/repo  ->  owner/name
    for part in reversed(Path(git_dir).resolve().parts):
        if "+" in part:
            owner, _, name = part.partition("+")
            return f"{owner}/{name}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where_ = p.add_mutually_exclusive_group(required=True)
    where_.add_argument("--git-dir", help="bare git dir (or .git) of a TensorRT-LLM clone/fork")
    where_.add_argument("--source-dir", help="directory holding the release's files at their repo paths")
    p.add_argument("--tag", help="release tag, e.g. v0.14.0")
    p.add_argument("--commit", help="commit to read (default: the tag's commit in --git-dir)")
    p.add_argument("--release", help="release name, e.g. 0.14 (default: from the tag)")
    p.add_argument("--source-repo", help="owner/name the source was read from (default: from --git-dir)")
    p.add_argument("--note", help="free text on where the tag->commit mapping came from")
    p.add_argument("--all", action="store_true",
                   help="every release in <out>/releases.json plus final vX.Y.0 tags in --git-dir")
    p.add_argument("--out", default="recipe_runner/data/trtllm", help="output directory")
    p.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    entries = load_index(out)
    try:
        jobs: list[dict[str, Any]] = []
        if args.all:
            if not args.git_dir:
                raise FactsError("--all needs --git-dir")
            for e in entries:
                jobs.append({"release": e["release"], "tag": e["tag"], "commit": e["commit"],
                             "note": _stored_note(out, e["release"])})
            known = {e["tag"] for e in entries}
            for tag in git(args.git_dir, "tag", "-l", "v*").split():
                if re.fullmatch(r"v\d+\.\d+\.0", tag) and tag not in known \
                        and version_key(tag)[:2] >= FIRST_RELEASE:
                    jobs.append({"release": release_of_tag(tag), "tag": tag,
                                 "commit": git(args.git_dir, "rev-parse", f"{tag}^{{commit}}"), "note": None})
        else:
            if not args.tag:
                raise FactsError("--tag is required (or --all)")
            commit = args.commit
            if args.git_dir:
                has_tag = subprocess.run(["git", "--git-dir", args.git_dir, "rev-parse", "-q", "--verify",
                                          f"refs/tags/{args.tag}^{{commit}}"], capture_output=True, text=True)
                tagged = has_tag.stdout.strip() if has_tag.returncode == 0 else None
                if commit is None:
                    if tagged is None:
                        raise FactsError(f"{args.git_dir} has no tag {args.tag}; pass --commit")
                    commit = tagged
                else:
                    commit = git(args.git_dir, "rev-parse", f"{commit}^{{commit}}")
                    if tagged is not None and tagged != commit:
                        raise FactsError(f"tag {args.tag} is {tagged} in {args.git_dir}, not {commit}")
            if commit is None or not re.fullmatch(r"[0-9a-f]{40}", commit):
                raise FactsError("--commit must be a full 40-hex commit id")
            jobs.append({"release": args.release or release_of_tag(args.tag), "tag": args.tag,
                         "commit": commit, "note": args.note})
        ok = True
        for job in jobs:
            if args.git_dir:
                source: Source = GitSource(args.git_dir, job["commit"])
                repo = args.source_repo or repo_from_git_dir(args.git_dir) or args.git_dir
            else:
                source = DirSource(args.source_dir)
                repo = args.source_repo or "unknown"
            doc = release_document(source, job["release"], job["tag"], job["commit"], repo, job["note"])
            ok &= write_or_check(out / f"{job['release']}.json", dumps(doc), args.check)
            entries = [e for e in entries if e["release"] != job["release"]]
            entries.append({"release": job["release"], "tag": job["tag"], "commit": job["commit"],
                            "version": doc["version"], "source_repo": repo, "file": f"{job['release']}.json"})
        ok &= write_or_check(out / "releases.json", index_text(entries), args.check)
        return 0 if ok else 1
    except FactsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _stored_note(out: Path, release: str) -> str | None:
    path = out / f"{release}.json"
    if path.is_file():
        return json.loads(path.read_text("utf-8")).get("commit_note")
    return None


if __name__ == "__main__":
    sys.exit(main())
