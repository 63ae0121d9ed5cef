"""The head_similarity entry: the per-layer head and neuron matches, and nothing stored before.

Each array of the pair analysis is stored once, in the entry of the stage that computed it:
shared token ids in ``vocabulary``, P and Q in ``transfer_matrix``, the CKA matrices in
``cka``, the layer mapping in ``layer_mapping``'s facts.  The ``head_similarity`` entry holds
only what it adds — ``matches.safetensors`` (per mapped old layer ``i``: ``head_similarity.i``,
the similarity matrix, and ``neuron_pairs.i``, the neuron assignment) and ``matches.json``
(head/kv pairs and the mean neuron similarity per layer).  A
:class:`~lorasuite_core.transfer.adapter.PairAnalysis` is put together from the entries
(:func:`lorasuite_core.pipeline.stages.pair_analysis`).  Plain data, no pickle; round-trips
exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorasuite_core.transfer.matching import LayerMatch

ARRAYS, FACTS = "matches.safetensors", "matches.json"


def save_matches(matches: dict[int, LayerMatch], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays, layers = {}, {}
    for i, m in matches.items():
        arrays[f"head_similarity.{i}"] = torch.from_numpy(np.ascontiguousarray(m.head_similarity))
        arrays[f"neuron_pairs.{i}"] = torch.from_numpy(np.ascontiguousarray(m.neuron_pairs).astype(np.int64))
        layers[str(i)] = {"head_pairs": m.head_pairs, "kv_pairs": m.kv_pairs,
                          "neuron_similarity_mean": m.neuron_similarity_mean}
    save_file({k: v.contiguous() for k, v in arrays.items()}, directory / ARRAYS)
    (directory / FACTS).write_text(json.dumps({"layers": layers}, indent=1))
    return directory


def load_matches(directory: str | Path) -> dict[int, LayerMatch]:
    directory = Path(directory)
    arrays = load_file(directory / ARRAYS)
    layers = json.loads((directory / FACTS).read_text())["layers"]
    return {
        int(i): LayerMatch(
            head_pairs=[tuple(p) for p in layer["head_pairs"]],
            kv_pairs=[tuple(p) for p in layer["kv_pairs"]],
            neuron_pairs=arrays[f"neuron_pairs.{i}"].numpy(),
            head_similarity=arrays[f"head_similarity.{i}"].numpy(),
            neuron_similarity_mean=layer["neuron_similarity_mean"],
        )
        for i, layer in layers.items()
    }
