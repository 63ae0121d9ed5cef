"""Monotone layer mapping by dynamic programming over a CKA similarity matrix.

Every old layer i is sent to a new layer m(i), non-decreasing in i, maximising Σ_i S[i, m(i)]
under two constraints:

    capacity  at most ``cap`` old layers share a new layer: cap = 1 when the new model is at
              least as deep (a strictly increasing, one-to-one mapping), ⌈L_old / L_new⌉ when it
              is shallower (old layers are spread evenly; their transferred deltas are summed);
    offset    the paper's drift bound: 0 ≤ m(i) − i ≤ offset when growing, 0 ≤ i − m(i) ≤ offset
              when shrinking (default |L_new − L_old|, which the capacity already implies when
              growing).

Without the capacity bound a shallower new model lets one layer with a large, generic update
absorb a dozen old layers. State (i, j, c): old layer i on new layer j as the c-th occupant;
O(L_old · L_new² · cap), trivial next to any forward pass.

Fixed mappings, the paper's ablations (the official code's ``--layer_method``), ignore the CKA:

    sequential  m(i) = round(i · (L_new − 1) / (L_old − 1))   old layers spread evenly, ends on ends
    first       m(i) = min(i, L_new − 1)                       aligned at the input end
    last        m(i) = max(i + L_new − L_old, 0)               aligned at the output end

All three are non-decreasing and cover every old layer; on a shallower new model the layers
that overflow one end share its last (first) layer, where their deltas are summed.
"""
from __future__ import annotations

import math

import numpy as np

from lorasuite_core.errors import LorasuiteError


LAYER_MAPPINGS = ("cka", "sequential", "first", "last")


def fixed_mapping(num_old: int, num_new: int, method: str) -> list[tuple[int, int]]:
    """A mapping that ignores similarity (``sequential``, ``first``, ``last``; see the module docstring)."""
    if num_old < 1 or num_new < 1:
        raise LorasuiteError(f"layer mapping needs layers on both sides, not {num_old} -> {num_new}")
    if method == "sequential":
        scale = (num_new - 1) / (num_old - 1) if num_old > 1 else 0.0
        return [(i, int(round(i * scale))) for i in range(num_old)]
    if method == "first":
        return [(i, min(i, num_new - 1)) for i in range(num_old)]
    if method == "last":
        return [(i, max(i + num_new - num_old, 0)) for i in range(num_old)]
    raise LorasuiteError(f"layer mapping must be one of {', '.join(LAYER_MAPPINGS)}, not {method!r}")


def _allowed(i: int, j: int, growing: bool, offset: int) -> bool:
    gap = j - i if growing else i - j
    return 0 <= gap <= offset


def map_layers(similarity: np.ndarray, offset: int | None = None) -> list[tuple[int, int]]:
    """similarity: L_old × L_new -> [(old layer, new layer)] for every old layer."""
    L_old, L_new = similarity.shape
    growing = L_old <= L_new
    cap = 1 if growing else math.ceil(L_old / L_new)
    offset = abs(L_new - L_old) if offset is None else offset
    best = np.full((L_old, L_new, cap), -np.inf)
    back = np.full((L_old, L_new, cap, 2), -1, dtype=np.int64)
    for j in range(L_new):
        if _allowed(0, j, growing, offset):
            best[0, j, 0] = similarity[0, j]
    for i in range(1, L_old):
        for j in range(L_new):
            if not _allowed(i, j, growing, offset):
                continue
            if j > 0:                                    # first occupant of j: come from any earlier layer
                prev = best[i - 1, :j].reshape(-1)
                k = int(np.argmax(prev))
                if np.isfinite(prev[k]):
                    best[i, j, 0] = prev[k] + similarity[i, j]
                    back[i, j, 0] = divmod(k, cap)
            for c in range(1, cap):                      # c-th occupant: previous old layer is on j too
                if np.isfinite(best[i - 1, j, c - 1]):
                    best[i, j, c] = best[i - 1, j, c - 1] + similarity[i, j]
                    back[i, j, c] = (j, c - 1)
    last = best[-1].reshape(-1)
    if not np.isfinite(last.max()):
        raise LorasuiteError(f"no monotone layer mapping of {L_old} onto {L_new} layers satisfies offset {offset}")
    j, c = divmod(int(np.argmax(last)), cap)
    mapping = [j]
    for i in range(L_old - 1, 0, -1):
        j, c = back[i, j, c]
        mapping.append(int(j))
    mapping.reverse()
    return list(enumerate(mapping))
