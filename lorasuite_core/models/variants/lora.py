"""LoRA: ``ΔW = (alpha / r) B A`` (``alpha / sqrt(r)`` under rsLoRA), honouring ``alpha_pattern``.

A module holds ``lora_A`` (r × in) and ``lora_B`` (out × r).  The written config keeps the old one's
options; ``r`` / ``lora_alpha`` are the most common rank and alpha of the migrated modules and the
others go to ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full module paths).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from lorasuite_core.models.families import Family
from lorasuite_core.models.variants.base import AdapterVariant, LoraFactors, config_peft_type


def alpha_for(module_key: str, config: dict[str, Any], rank: int) -> float:
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(patterns), module_key)
    return float(patterns.get(key, config.get("lora_alpha", rank)))


def scaling(alpha: float, rank: int, config: dict[str, Any]) -> float:
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


class Lora(AdapterVariant):
    name, label, peft_type = "lora", "LoRA", "LORA"
    parts = frozenset({"A", "B"})

    def matches(self, config: dict[str, Any]) -> bool:
        return config_peft_type(config) != "ADALORA" and not config.get("use_dora")

    def read_module(self, A: torch.Tensor, B: torch.Tensor, parts: dict[str, torch.Tensor], config: dict[str, Any],
                    module: str, uri: str) -> LoraFactors:
        alpha = alpha_for(module, config, A.shape[0])
        magnitude = self.magnitude(parts, B, module, uri)
        return LoraFactors(A, B, scaling(alpha, A.shape[0], config), alpha, magnitude)

    def magnitude(self, parts: dict[str, torch.Tensor], B: torch.Tensor, module: str, uri: str) -> torch.Tensor | None:
        return None

    def rank_config(self, config: dict[str, Any], family: Family, modules: Sequence[Any]) -> dict[str, Any]:
        ranks = [m.rank for m in modules]
        alphas = [m.alpha for m in modules]
        r = max(set(ranks), key=ranks.count)
        alpha = max(set(alphas), key=alphas.count)
        rank_pattern, alpha_pattern = {}, {}
        for m in modules:
            key = family.module_key(m.layer, m.name).replace(".", r"\.")
            if m.rank != r:
                rank_pattern[key] = m.rank
            if m.alpha != alpha:
                alpha_pattern[key] = m.alpha
        return {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


LORA = Lora()
