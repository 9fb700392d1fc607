"""recipe-runner: declarative, reproducible TensorRT-LLM checkpoint and engine builds."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "convert", "load_recipe"]


def __getattr__(name: str):
    # Lazy, off the warm path: `import recipe_runner` (and `recipe --help`) must not import torch (api)
    if name == "convert":
        from recipe_runner.api import convert

        return convert
    if name == "load_recipe":
        from recipe_runner.recipe import load_recipe  # jinja2, jsonschema: off a bare `import recipe_runner`

        return load_recipe
    raise AttributeError(name)
