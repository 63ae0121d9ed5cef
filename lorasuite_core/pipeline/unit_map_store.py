"""The unit_maps entry: the unit maps of every mapped layer pair, in one head-transform mode.

The maps depend on the adapter option ``head_transform`` (lstsq | paper), so the entry is keyed by
it (:func:`~lorasuite_core.pipeline.plans.plan_pair`).  The pair stage runs once per run, in the
mode its adapters ask for (:func:`~lorasuite_core.pipeline.runner.pair_head_transform`: theirs when
they agree, else the default ``lstsq``); an adapter in the other mode computes its maps inside its
own layer jobs, as before the stage existed, with the same bits.  So a single migration never
computes maps it does not use, and a fleet in one mode computes them once.

Layout, one safetensors file per mapped layer pair so that a per-layer job reads only its own:

* ``maps.<i>.safetensors`` (old layer ``i``): per role ``<role>.M`` (K × h_n × h_o, float64),
  ``<role>.a`` and ``<role>.b`` (K, int64: the matched old and new units);
* ``unit_maps.json``: the format, the mode and per old layer ``i`` its new layer and, per role,
  ``n_old``, ``n_new`` (unit counts) and ``fit`` (JSON floats round-trip exactly).

:class:`~lorasuite_core.transfer.unit_maps.RoleMap` round-trips bit for bit.  Loaded maps are
memoised per process (a fleet run migrates every adapter's layers in one process), the index by
directory and each layer's maps by (directory, layer).  Plain data, no pickle.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorasuite_core.transfer.unit_maps import RoleMap

INDEX, FORMAT = "unit_maps.json", "lorasuite.unit-maps/v1"


def _file(i: int) -> str:
    return f"maps.{i}.safetensors"


def save_unit_maps(maps: dict[tuple[int, int], dict[str, RoleMap]], mode: str, directory: str | Path) -> Path:
    """``maps``: (old layer i, new layer j) -> role -> its maps."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {}
    for (i, j), roles in maps.items():
        tensors = {}
        for role, m in roles.items():
            tensors.update({f"{role}.M": m.M.contiguous(), f"{role}.a": m.a.contiguous(), f"{role}.b": m.b.contiguous()})
        save_file(tensors, directory / _file(i))
        layers[str(i)] = {"new_layer": j, "roles": {role: {"n_old": m.n_old, "n_new": m.n_new, "fit": m.fit}
                                                    for role, m in roles.items()}}
    (directory / INDEX).write_text(json.dumps({"format": FORMAT, "mode": mode, "layers": layers}, indent=1))
    return directory


@lru_cache(maxsize=8)
def _index(directory: str) -> dict:
    index = json.loads((Path(directory) / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{Path(directory) / INDEX}: unknown unit-maps format {index.get('format')!r}")
    return index


@lru_cache(maxsize=256)
def _layer(directory: str, i: int) -> tuple[int, dict[str, RoleMap]]:
    entry = _index(directory)["layers"][str(i)]
    tensors = load_file(Path(directory) / _file(i))
    return entry["new_layer"], {role: RoleMap(tensors[f"{role}.a"], tensors[f"{role}.b"], tensors[f"{role}.M"],
                                              r["n_old"], r["n_new"], r["fit"])
                                for role, r in entry["roles"].items()}


def load_layer_maps(directory: str | Path, i: int, j: int, mode: str) -> dict[str, RoleMap]:
    """The maps of old layer ``i`` onto new layer ``j`` in ``mode``; a mismatch names what differs."""
    directory = str(directory)
    index = _index(directory)
    if index["mode"] != mode:
        raise ValueError(f"{directory}: unit maps in mode {index['mode']!r}, asked for {mode!r}")
    if str(i) not in index["layers"]:
        raise ValueError(f"{directory}: no unit maps for old layer {i}")
    stored_j, maps = _layer(directory, i)
    if stored_j != j:
        raise ValueError(f"{directory}: old layer {i} maps onto new layer {stored_j}, asked for {j}")
    return maps


def clear_memo() -> None:
    _index.cache_clear()
    _layer.cache_clear()
