"""AdaLoRA: ``ΔW = c P diag(E) Q`` with ``P = lora_B`` (out × r), ``E = lora_E`` (r × 1),
``Q = lora_A`` (r × in) and ``c = alpha / (ranknum + 1e-5)`` (PEFT's ``SVDLinear``).

``ranknum`` is ``init_r`` for every module: PEFT restores it after pruning by ``rank_pattern``,
whose boolean masks give the pruned ranks the tensors were saved with.  Read as ``B = P``,
``A = diag(E) Q``, ``scaling = c``; rank-0 modules (fully pruned) carry nothing and are skipped.
The transfer re-factorises to the same SVD form (``svd_form``, refactor.py), keeps each module's
rank and writes the rank budget back as ``rank_pattern`` masks ``[True] * r + [False] * (init_r − r)``
whenever a rank differs from ``init_r``.  The vanilla baseline is a fresh LoRA at rank ``init_r``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.families import Family
from lorasuite_core.models.variants.base import AdapterVariant, LoraFactors, config_peft_type

INIT_R = 12          # PEFT's AdaLoraConfig default
EPS = 1e-5           # SVDLinear divides by ranknum + 1e-5


class AdaLora(AdapterVariant):
    name, label, peft_type = "adalora", "AdaLoRA", "ADALORA"
    parts = frozenset({"A", "B", "E"})
    svd_form = True

    def matches(self, config: dict[str, Any]) -> bool:
        return config_peft_type(config) == "ADALORA"

    def check_config(self, config: dict[str, Any], uri: str) -> None:
        if config.get("use_dora"):
            raise LorasuiteError(f"adapter {uri}: AdaLoRA with use_dora=true is not an adapter PEFT can build")

    def read_module(self, A: torch.Tensor, B: torch.Tensor, parts: dict[str, torch.Tensor], config: dict[str, Any],
                    module: str, uri: str) -> LoraFactors | None:
        """ΔW = alpha / (init_r + 1e-5) · B diag(E) P, read as B · (diag(E) P) (module docstring)."""
        r = A.shape[0]
        if r == 0:
            return None                      # fully pruned: ΔW = 0
        E = parts["E"].double()
        if E.numel() != r:
            raise LorasuiteError(f"adapter {uri}: {module} has lora_E of {E.numel()} values but rank {r}")
        alpha = float(config.get("lora_alpha") or 0)
        init_r = int(config.get("init_r") or INIT_R)
        scaling = (alpha if alpha > 0 else float(r)) / (init_r + EPS)
        return LoraFactors(E.reshape(r, 1) * A, B, scaling, alpha)

    def rank_config(self, config: dict[str, Any], family: Family, modules: Sequence[Any]) -> dict[str, Any]:
        """The old rank budget (init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight,
        total_step, lora_alpha) stays; ``rank_pattern`` holds PEFT's saved masks
        {"<module path>.lora_E": [True]*r + [False]*(init_r − r)} whenever a module's rank differs from
        init_r (PEFT then resizes each module to its r before loading)."""
        init_r = int(config.get("init_r") or INIT_R)
        too_big = [m for m in modules if m.rank > init_r]
        if too_big:
            raise LorasuiteError(f"AdaLoRA module {too_big[0].name} has rank {too_big[0].rank} above init_r {init_r}")
        pattern = {f"{family.module_key(m.layer, m.name)}.lora_E": [True] * m.rank + [False] * (init_r - m.rank)
                   for m in modules}
        return {"rank_pattern": pattern if any(m.rank != init_r for m in modules) else None}

    def check_rank(self, module: str, rank: int, config: dict[str, Any], uri: str) -> None:
        """At most ``init_r``: the rank budget prunes below it."""
        init_r = int(config.get("init_r") or INIT_R)
        if rank > init_r:
            raise LorasuiteError(f"adapter {uri}: {module} has rank {rank} but adapter_config.json says init_r = {init_r}")

    def baseline_rank(self, config: dict[str, Any]) -> int:
        return int(config.get("init_r", INIT_R))


ADALORA = AdaLora()
