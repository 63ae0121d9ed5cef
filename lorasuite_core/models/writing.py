"""Writing a migrated adapter as a PEFT directory: ``adapter_config.json``, ``adapter_model.safetensors``
and the migration report, atomically.

The config is the old adapter's, with the new model's targets; ``layers_to_transform`` lists the
layers holding modules (None: all) and ``exclude_modules`` the (layer, target) pairs PEFT would
otherwise create freshly.  The rank fields come from the adapter's variant
(:meth:`~lorasuite_core.models.variants.base.AdapterVariant.rank_config`: LoRA's ``r`` /
``lora_alpha`` / patterns, AdaLoRA's ``rank_pattern`` masks over ``init_r``).  Tensors use PEFT's saved keys: ``lora_A`` /
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
from lorasuite_core.models.loading import LoadedModel
from lorasuite_core.models.variants import variant_of

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
    """A migrated adapter as the writer reads it (``transfer.adapter.MigratedAdapter``)."""
    modules: Sequence[WrittenModule]


def adapter_config(old_config: dict, new: LoadedModel, migrated: WrittenAdapter) -> dict:
    """The old config with the new model's targets, layers and exclusions; the rank fields from the variant."""
    config = dict(old_config)
    rank_fields = variant_of(old_config).rank_config(old_config, new.family, migrated.modules)
    layers = sorted({m.layer for m in migrated.modules})
    config.update(
        base_model_name_or_path=new.source,
        target_modules=sorted({m.name for m in migrated.modules}),
        **rank_fields,
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
    from lorasuite_core.io.outputs import check_output_location

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
