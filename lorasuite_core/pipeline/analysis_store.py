"""Persisting a model pair's analysis so every adapter of a fleet reuses it.

A directory holds ``analysis.safetensors`` (the arrays: P, Q, CKA matrices, shared token
ids, per-layer head similarities and neuron assignments) and ``analysis.json`` (the small
facts: scale, fit residuals, layer mapping, head/kv assignments, calibration counts). Both are
plain data — no pickle — and round-trip exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorasuite_core.transfer.matching import LayerMatch
from lorasuite_core.transfer.adapter import PairAnalysis
from lorasuite_core.transfer.residual import ResidualTransfer
from lorasuite_core.transfer.vocab import SharedVocabulary

ARRAYS, FACTS = "analysis.safetensors", "analysis.json"


def save_analysis(analysis: PairAnalysis, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rt = analysis.residual
    arrays = {
        "P": rt.P, "Q": rt.Q,
        "cka_updates": torch.from_numpy(np.ascontiguousarray(analysis.cka_updates)),
        "cka_states": torch.from_numpy(np.ascontiguousarray(analysis.cka_states)),
        "shared_old_ids": torch.from_numpy(analysis.shared.old_ids),
        "shared_new_ids": torch.from_numpy(analysis.shared.new_ids),
    }
    layers = {}
    for i, m in analysis.matches.items():
        arrays[f"head_similarity.{i}"] = torch.from_numpy(np.ascontiguousarray(m.head_similarity))
        arrays[f"neuron_pairs.{i}"] = torch.from_numpy(np.ascontiguousarray(m.neuron_pairs).astype(np.int64))
        layers[str(i)] = {"head_pairs": m.head_pairs, "kv_pairs": m.kv_pairs,
                          "neuron_similarity_mean": m.neuron_similarity_mean}
    facts = {
        "scale": rt.scale, "fit_residual_old": rt.fit_residual_old, "fit_residual_new": rt.fit_residual_new,
        "layer_mapping": analysis.layer_mapping, "layers": layers, "calibration": analysis.calibration,
    }
    save_file({k: v.contiguous() for k, v in arrays.items()}, directory / ARRAYS)
    (directory / FACTS).write_text(json.dumps(facts, indent=1))
    return directory


def load_analysis(directory: str | Path) -> PairAnalysis:
    directory = Path(directory)
    arrays = load_file(directory / ARRAYS)
    facts = json.loads((directory / FACTS).read_text())
    rt = ResidualTransfer(arrays["P"], arrays["Q"], facts["scale"], facts["fit_residual_old"], facts["fit_residual_new"])
    matches = {
        int(i): LayerMatch(
            head_pairs=[tuple(p) for p in layer["head_pairs"]],
            kv_pairs=[tuple(p) for p in layer["kv_pairs"]],
            neuron_pairs=arrays[f"neuron_pairs.{i}"].numpy(),
            head_similarity=arrays[f"head_similarity.{i}"].numpy(),
            neuron_similarity_mean=layer["neuron_similarity_mean"],
        )
        for i, layer in facts["layers"].items()
    }
    return PairAnalysis(
        shared=SharedVocabulary(arrays["shared_old_ids"].numpy(), arrays["shared_new_ids"].numpy()),
        residual=rt,
        cka_updates=arrays["cka_updates"].numpy(),
        cka_states=arrays["cka_states"].numpy(),
        layer_mapping=[tuple(p) for p in facts["layer_mapping"]],
        matches=matches,
        calibration=facts["calibration"],
    )
