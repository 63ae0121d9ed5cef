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
— the engines would refuse or ignore them.  Not exact, so refused: DoRA (its magnitude
normalises ``W + ΔW`` row by row; vLLM cannot serve it), LoRA on embeddings, a rank above 512.
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


def export_plain_lora(adapter_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the plain-LoRA form of ``adapter_dir`` to ``out_dir`` (other files copied); returns what changed."""
    source, out = Path(adapter_dir), Path(out_dir)
    layout = read_layout(source)
    if layout.variant == "dora":
        raise LorasuiteError("vLLM cannot serve DoRA adapters (nor do LoRAX/TGI apply the magnitude vector); "
                             "drop --serving vllm to publish the DoRA adapter for PEFT")
    if layout.embedding_lora:
        raise LorasuiteError(f"LoRA on embeddings ({layout.embedding_lora[0]}) cannot be served by vLLM; "
                             "drop --serving vllm")
    factors = load_module_factors(source, layout)
    ranks = [A.shape[0] for A, _, _ in factors.values()]
    rank = vllm_rank(max(ranks, default=1))
    if rank is None:
        raise LorasuiteError(f"rank {max(ranks)} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")
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
    return {"engine": "vllm", "rank": rank, "padded_from": sorted(set(ranks)), "source_variant": layout.variant,
            "rescaled_modules": sum(1 for _, _, s in factors.values() if s != s_ref), "left_out": layout.other}
