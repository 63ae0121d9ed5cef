"""Writing a migrated adapter as a PEFT directory: ``adapter_config.json``, ``adapter_model.safetensors``
and the migration report, atomically.

The config is the old adapter's, with the new model's targets: ``r`` / ``lora_alpha`` are the most
common rank and alpha, the others go to ``rank_pattern`` / ``alpha_pattern``; ``layers_to_transform``
lists the layers holding modules (None: all) and ``exclude_modules`` the (layer, target) pairs PEFT would
otherwise create freshly.  AdaLoRA keeps its rank budget and writes each module's rank as PEFT's
boolean ``rank_pattern`` mask over ``init_r``.  Tensors use PEFT's saved keys: ``lora_A`` /
``lora_B`` ``.weight`` (+ ``lora_magnitude_vector`` for DoRA); AdaLoRA's ``lora_A``, ``lora_B``,
``lora_E`` without ``.weight``.

The directory is written into a sibling temporary directory and moved into place, so an output
is never half-written.  The modules come from :mod:`lorasuite_core.transfer.adapter`
(``WrittenAdapter``); this module only reads the attributes :class:`WrittenModule` names.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from safetensors.torch import save_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import ADALORA_INIT_R, LoadedModel, adapter_variant

REPORT_NAME = "migration_report.json"


class WrittenModule(Protocol):
    """One migrated module as the writer reads it (``transfer.adapter.MigratedModule``)."""
    layer: int
    name: str
    rank: int
    alpha: float
    factors: Any                       # .A (r × in), .B (out × r), .E (r × 1, AdaLoRA) or None
    magnitude: torch.Tensor | None     # DoRA (out,)


class WrittenAdapter(Protocol):
    """A migrated adapter as the writer reads it (``transfer.adapter.WrittenAdapter``)."""
    modules: Sequence[WrittenModule]


def adapter_config(old_config: dict, new: LoadedModel, migrated: WrittenAdapter) -> dict:
    if adapter_variant(old_config) == "adalora":
        return _adalora_config(old_config, new, migrated)
    config = dict(old_config)
    ranks = [m.rank for m in migrated.modules]
    alphas = [m.alpha for m in migrated.modules]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    rank_pattern, alpha_pattern = {}, {}
    for m in migrated.modules:
        key = new.family.module_key(m.layer, m.name).replace(".", r"\.")
        if m.rank != r:
            rank_pattern[key] = m.rank
        if m.alpha != alpha:
            alpha_pattern[key] = m.alpha
    layers = sorted({m.layer for m in migrated.modules})
    config.update(
        base_model_name_or_path=new.source,
        target_modules=sorted({m.name for m in migrated.modules}),
        r=r,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=None if layers == list(range(new.dims.num_layers)) else layers,
        layers_pattern=None,
        exclude_modules=_excluded_modules(new, migrated, layers),
        revision=None,
    )
    return config


def _excluded_modules(new: LoadedModel, migrated: WrittenAdapter, layers: list[int]) -> list[str] | None:
    """Full paths of the (layer, target) pairs PEFT would otherwise create freshly (target_modules ×
    layers_to_transform minus the migrated modules): a fresh DoRA module on an all-zero weight row is NaN."""
    have = {(m.layer, m.name) for m in migrated.modules}
    names = sorted({m.name for m in migrated.modules})
    missing = [new.family.module_key(j, name) for j in layers for name in names if (j, name) not in have]
    return missing or None


def _adalora_config(old_config: dict, new: LoadedModel, migrated: WrittenAdapter) -> dict:
    """The old AdaLoRA config (rank budget: init_r, target_r, tinit, tfinal, deltaT, beta1, beta2,
    orth_reg_weight, total_step, lora_alpha) with the new model's targets and ``rank_pattern``:
    {"<module path>.lora_E": [True]*r + [False]*(init_r − r)}, PEFT's saved masks, whenever a
    module's rank differs from init_r (PEFT then resizes each module to its r before loading)."""
    config = dict(old_config)
    init_r = int(config.get("init_r") or ADALORA_INIT_R)
    too_big = [m for m in migrated.modules if m.rank > init_r]
    if too_big:
        raise LorasuiteError(f"AdaLoRA module {too_big[0].name} has rank {too_big[0].rank} above init_r {init_r}")
    pattern = {f"{new.family.module_key(m.layer, m.name)}.lora_E": [True] * m.rank + [False] * (init_r - m.rank)
               for m in migrated.modules}
    layers = sorted({m.layer for m in migrated.modules})
    config.update(
        base_model_name_or_path=new.source,
        target_modules=sorted({m.name for m in migrated.modules}),
        rank_pattern=pattern if any(m.rank != init_r for m in migrated.modules) else None,
        layers_to_transform=None if layers == list(range(new.dims.num_layers)) else layers,
        layers_pattern=None,
        exclude_modules=_excluded_modules(new, migrated, layers),
        revision=None,
    )
    return config


def adapter_tensors(new: LoadedModel, migrated: WrittenAdapter) -> dict[str, torch.Tensor]:
    """PEFT's saved keys: lora_A/lora_B ``.weight`` (+ ``lora_magnitude_vector`` for DoRA);
    AdaLoRA's parameters lora_A, lora_B, lora_E without ``.weight``."""
    tensors = {}
    for m in migrated.modules:
        key = f"base_model.model.{new.family.module_key(m.layer, m.name)}"
        if m.factors.E is not None:
            tensors[f"{key}.lora_A"] = m.factors.A.contiguous()
            tensors[f"{key}.lora_B"] = m.factors.B.contiguous()
            tensors[f"{key}.lora_E"] = m.factors.E.contiguous()
            continue
        tensors[f"{key}.lora_A.weight"] = m.factors.A.contiguous()
        tensors[f"{key}.lora_B.weight"] = m.factors.B.contiguous()
        if m.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = m.magnitude.contiguous()
    return tensors


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    from lorasuite_core.io.storage import check_output_location

    check_output_location(out, {})   # never empty, the working directory or one of its parents
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise LorasuiteError(f"output {out} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise LorasuiteError(f"output {out} exists and is not empty; pass --overwrite to replace it")


def write_adapter_dir(out: str | Path, config: dict, tensors: dict, report: dict, overwrite: bool) -> Path:
    """Write into a sibling temporary directory, then move it into place: never half-written."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
