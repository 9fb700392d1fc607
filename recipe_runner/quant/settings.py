"""The quantization settings of a stage that quantizes (quantize, export-hf-*), from its params."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from recipe_runner.quant.algorithms import ALGORITHMS, Algorithm, needs_calibration


@dataclass(frozen=True)
class QuantSettings:
    algo: str
    kv_cache: str = "none"
    group_size: int = 128
    smoothquant_alpha: float | str = 0.5  # or "auto": per layer and input group, from calibration (sq_auto.py)
    # fnmatch patterns over TensorRT-LLM module names (trtllm/quant.py, hfexport/exclusion.py)
    exclude_modules: tuple[str, ...] = ("lm_head",)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> QuantSettings:
        """From a stage's params: the quantize stage holds every quantization field, an export stage only
        those its algo reads (pipeline/plan.py), so a missing field keeps its default."""
        known = {f.name: params[f.name] for f in fields(cls) if f.name in params}
        if "exclude_modules" in known:
            known["exclude_modules"] = tuple(known["exclude_modules"])
        return cls(**known)

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.algo]

    @property
    def needs_statistics(self) -> bool:
        return needs_calibration(self.algo, self.kv_cache)
