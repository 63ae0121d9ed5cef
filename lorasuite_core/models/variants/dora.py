"""DoRA: LoRA's ``ΔW`` plus the magnitude ``m`` (out,): PEFT's weight is
``W' = diag(m / ‖W + ΔW‖_row) (W + ΔW)``, the norm of each output row over the input dimension
(``DoraLinearLayer.get_weight_norm``).

A module holds ``lora_A``, ``lora_B`` and ``lora_magnitude_vector``; the config says ``use_dora``.
The transfer carries the effective change ``W' − W`` and fits the new magnitude
(``has_magnitude``, :mod:`lorasuite_core.transfer.dora`); the vanilla baseline is a fresh DoRA.
"""
from __future__ import annotations

from typing import Any

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.variants.base import config_peft_type
from lorasuite_core.models.variants.lora import Lora


class Dora(Lora):
    name, label, peft_type = "dora", "DoRA", "LORA"
    parts = frozenset({"A", "B", "magnitude_vector"})
    has_magnitude = True
    baseline_use_dora = True

    def matches(self, config: dict[str, Any]) -> bool:
        return config_peft_type(config) != "ADALORA" and bool(config.get("use_dora"))

    def magnitude(self, parts: dict[str, torch.Tensor], B: torch.Tensor, module: str, uri: str) -> torch.Tensor:
        magnitude = parts["magnitude_vector"].double()
        if magnitude.shape != (B.shape[0],):
            raise LorasuiteError(f"adapter {uri}: {module} has lora_magnitude_vector of shape {tuple(magnitude.shape)} "
                                 f"but {B.shape[0]} output rows")
        return magnitude


DORA = Dora()
