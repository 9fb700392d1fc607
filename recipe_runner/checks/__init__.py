"""Every rule a recipe must meet, in one place, as (recipe field, message) findings that the caller
locates (file:line:col) and reports together, before any stage runs.

Format modules (trtllm/, hfexport/, quant/, models/) export facts; the modules here turn those facts
into findings:

  recipe.py        the recipe alone (cross-field rules), when it loads
  targets.py       output targets against the quantization (load time) and the model's shapes
  mapping.py       tp/pp/embedding split against the model
  quantization.py  the quantization against the model (groups, exclusions, KV heads, the tokenizer)
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from recipe_runner.checks.mapping import mapping_findings
from recipe_runner.checks.quantization import quantization_findings
from recipe_runner.trtllm.mapping import ParallelMapping

if TYPE_CHECKING:
    from recipe_runner.hf.config import ModelConfig

Finding = tuple[str, str]


def model_findings(model: "ModelConfig", recipe: Mapping[str, Any], source_dir: Path) -> list[Finding]:
    """The rules that need the source's config.json (and its tokenizer files), at plan time."""
    mapping = ParallelMapping.from_recipe(recipe["mapping"])  # built once, for every rule below
    return [*mapping_findings(mapping, model), *quantization_findings(model, recipe, mapping, source_dir)]
