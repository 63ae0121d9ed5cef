"""``--serving vllm``: rewrite an adapter into the plain LoRA that vLLM, LoRAX and TGI read, exactly.

Math.  A module's update is ``ΔW_m = s_m B_m A_m`` (``A_m``: r_m × in, ``B_m``: out × r_m; ``s_m``
PEFT's scaling: ``α_m / r_m``, ``α_m / √r_m`` with rsLoRA, ``α / (init_r + 1e-5)`` for AdaLoRA, whose
``E`` is folded into ``A_m = diag(E) P``).  The engines apply one scaling ``s = α / r`` to every
module (:mod:`.engines`).  With ``R`` = the smallest vLLM ``max_lora_rank`` ≥ max r_m and ``s_ref``
the most common ``s_m``, the export writes

    A'_m = [A_m; 0]              (R × in: zero rows below)
    B'_m = [(s_m / s_ref) B_m, 0] (out × R: zero columns right)
    r = R, lora_alpha = s_ref · R, no rank/alpha patterns, no rsLoRA

so ``(α/r) B'_m A'_m = s_ref (s_m / s_ref) B_m A_m + 0 = ΔW_m``: the padded rows and columns add
exact zeros, and where every ``s_m`` equals ``s_ref`` (a plain LoRA) ``B`` is unchanged, so PEFT's
outputs are the same.  Tensors keep their dtype and get PEFT's names ``lora_A.weight`` /
``lora_B.weight``.  Non-LoRA weights (saved modules, full embeddings) are left out with a warning
— the engines would refuse or ignore them.  Not exact, so refused: LoRA on embeddings, a rank
above 512, and DoRA (vLLM cannot serve it) unless approximated:

DoRA as plain LoRA (``--serving vllm-lora``, needs the base model).  PEFT's DoRA computes
``W' = diag(c) (W + s B A)``, ``c = m / ‖W + s B A‖_row``, so its update ``ΔW = W' − W =
diag(c − 1) W + diag(c) s B A`` is in general of full rank.  It is formed densely per module (float64),
its best rank-R approximation taken by a randomized SVD (``torch.svd_lowrank``, R as above),
``B' = U √Σ``, ``A' = √Σ Vᵀ`` (scaling 1: ``lora_alpha = R``), and the relative residual
``‖ΔW − B'A'‖_F / ‖ΔW‖_F`` computed exactly from the factors written and reported per module
(``dora_residual``).  Where ``m`` equals ``‖W + s B A‖_row`` (c = 1) the update is ``s B A`` and the
residual is zero up to rounding.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorasuite_core.errors import LorasuiteError

from .engines import VLLM_MAX_LORA_RANKS, load_module_factors, read_layout, vllm_rank

log = logging.getLogger(__name__)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _lora_config(config: dict[str, Any], rank: int, alpha: float) -> dict[str, Any]:
    """PEFT's LoraConfig fields of ``config`` (AdaLoRA-only fields dropped) with one rank and alpha."""
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig)}
    values = {k: v for k, v in config.items() if k in names}
    values.update(peft_type="LORA", r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                  use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={}, modules_to_save=None)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in values.items()}


def _dora_as_lora(adapter_dir: Path, layout, base_model: str | Path, rank: int
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, float]]:
    """Per DoRA module the rank-``rank`` plain-LoRA ``(A', B', 1.0)`` of its update, and the relative residuals."""
    from safetensors import safe_open

    from lorasuite_core.models.loading import SafetensorsWeights, resolve_local_dir

    weights = SafetensorsWeights(resolve_local_dir(str(base_model), "model"))
    factors, residuals = {}, {}
    dora = load_module_factors(adapter_dir, layout)
    with safe_open(adapter_dir / WEIGHTS, framework="pt") as handle:
        for module, (A, B, s) in dora.items():
            m = handle.get_tensor(layout.keys[module]["magnitude_vector"]).double()
            W = weights.get(f"{module}.weight").double()
            adapted = W + s * (B.double() @ A.double())
            delta = (m / adapted.norm(dim=1)).unsqueeze(1) * adapted - W
            q = min(rank, *delta.shape)
            U, S, V = torch.svd_lowrank(delta, q=q, niter=6, M=None)
            root = S.sqrt()
            B_new, A_new = U * root, (V * root).T
            norm = delta.norm()
            residuals[module] = float((delta - B_new @ A_new).norm() / norm) if norm > 0 else 0.0
            pad = rank - q
            factors[module] = (torch.cat([A_new, A_new.new_zeros(pad, A_new.shape[1])]).to(A.dtype),
                               torch.cat([B_new, B_new.new_zeros(B_new.shape[0], pad)], 1).to(B.dtype), 1.0)
    return factors, residuals


def export_plain_lora(adapter_dir: str | Path, out_dir: str | Path, *,
                      dora_base_model: str | Path | None = None) -> dict[str, Any]:
    """Write the plain-LoRA form of ``adapter_dir`` to ``out_dir`` (other files copied); returns what changed.

    A DoRA adapter is refused unless ``dora_base_model`` is given: then its rank-R plain-LoRA
    approximation is written and each module's relative residual reported (module docstring)."""
    source, out = Path(adapter_dir), Path(out_dir)
    layout = read_layout(source)
    if layout.variant == "dora" and dora_base_model is None:
        raise LorasuiteError("vLLM cannot serve DoRA adapters (nor do LoRAX/TGI apply the magnitude vector); "
                             "--serving vllm-lora publishes a plain-LoRA approximation with its residual reported")
    if layout.embedding_lora:
        raise LorasuiteError(f"LoRA on embeddings ({layout.embedding_lora[0]}) cannot be served by vLLM; "
                             "drop --serving vllm")
    factors = load_module_factors(source, layout)
    ranks = [A.shape[0] for A, _, _ in factors.values()]
    rank = vllm_rank(max(ranks, default=1))
    if rank is None:
        raise LorasuiteError(f"rank {max(ranks)} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
    residuals = None
    if layout.variant == "dora":
        factors, residuals = _dora_as_lora(source, layout, dora_base_model, rank)
        log.warning("vLLM cannot serve DoRA: publishing a rank-%d plain-LoRA approximation (relative residual up "
                    "to %.3g, per module in the report's serving_export)", rank, max(residuals.values(), default=0.0))
    s_ref = Counter(s for _, _, s in factors.values()).most_common(1)[0][0]
    tensors = {}
    for module, (A, B, s) in factors.items():
        r = A.shape[0]
        ratio = s / s_ref
        B = B if ratio == 1.0 else (B.double() * ratio).to(B.dtype)
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat([A, A.new_zeros(rank - r, A.shape[1])]).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1).contiguous()
    if layout.other:
        log.warning("--serving vllm: leaving out %d non-LoRA weight(s) (%s%s): serving engines refuse or ignore them",
                    len(layout.other), layout.other[0], ", ..." if len(layout.other) > 1 else "")
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in (WEIGHTS, CONFIG):
            shutil.copy2(item, out / item.name)
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(_lora_config(layout.config, rank, s_ref * rank), indent=2, sort_keys=True) + "\n")
    facts = {"engine": "vllm", "rank": rank, "padded_from": sorted(set(ranks)), "source_variant": layout.variant,
             "rescaled_modules": sum(1 for _, _, s in factors.values() if s != s_ref), "left_out": layout.other}
    if residuals is not None:
        facts["dora_residual"] = {"max": max(residuals.values(), default=0.0), "modules": residuals}
    return facts
