"""Saving one new layer's transfer result (:class:`~lorasuite_core.transfer.adapter.NewLayerResult`) to files.

The per-layer unit of work runs as its own task, possibly on another machine, so its result
travels as files: ``layer.safetensors`` holds every module's re-factorised ``A`` and ``B``
(float32, as :func:`~lorasuite_core.transfer.refactor.refactorise` returns them) under
``module.<index>.A`` / ``module.<index>.B`` (AdaLoRA's singular values under ``module.<index>.E``,
DoRA's magnitude under ``module.<index>.magnitude``, where present), and ``layer.json`` the rest (module names, ranks,
alphas, source layers, residuals, fit diagnostics, carried roles) in module order.  Both are
plain data, no pickle; JSON floats round-trip exactly, so
``load_layer_result(save_layer_result(r))`` equals ``r`` bit for bit and the assembled adapter
is the one :func:`~lorasuite_core.transfer.adapter.migrate` writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorasuite_core.transfer.adapter import MigratedModule, NewLayerResult
from lorasuite_core.transfer.refactor import Refactorised

TENSORS, FACTS = "layer.safetensors", "layer.json"
FORMAT = "lorasuite.layer-result/v1"


def save_layer_result(result: NewLayerResult, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, []
    for index, m in enumerate(result.modules):
        tensors[f"module.{index}.A"] = m.factors.A.contiguous()
        tensors[f"module.{index}.B"] = m.factors.B.contiguous()
        if m.factors.E is not None:
            tensors[f"module.{index}.E"] = m.factors.E.contiguous()
        if m.magnitude is not None:
            tensors[f"module.{index}.magnitude"] = m.magnitude.contiguous()
        modules.append({"layer": m.layer, "name": m.name, "rank": m.rank, "alpha": m.alpha,
                        "old_layers": list(m.old_layers), "residual": m.factors.residual,
                        "magnitude_fit": m.magnitude_fit})
    facts = {"format": FORMAT, "modules": modules, "unit_fit": result.unit_fit,
             "input_offsets": result.input_offsets, "roles": sorted(result.roles)}
    save_file(tensors, directory / TENSORS)
    (directory / FACTS).write_text(json.dumps(facts, indent=1))
    return directory


def load_layer_result(directory: str | Path) -> NewLayerResult:
    directory = Path(directory)
    facts = json.loads((directory / FACTS).read_text())
    if facts.get("format") != FORMAT:
        raise ValueError(f"{directory / FACTS}: unknown layer-result format {facts.get('format')!r}")
    tensors = load_file(directory / TENSORS)
    modules = [
        MigratedModule(
            layer=m["layer"], name=m["name"],
            factors=Refactorised(A=tensors[f"module.{i}.A"], B=tensors[f"module.{i}.B"], residual=m["residual"],
                                 E=tensors.get(f"module.{i}.E")),
            rank=m["rank"], alpha=m["alpha"], old_layers=list(m["old_layers"]),
            magnitude=tensors.get(f"module.{i}.magnitude"), magnitude_fit=m.get("magnitude_fit"),
        )
        for i, m in enumerate(facts["modules"])
    ]
    return NewLayerResult(modules, dict(facts["unit_fit"]), dict(facts["input_offsets"]), set(facts["roles"]))
