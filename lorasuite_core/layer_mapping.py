"""Monotone layer mapping by dynamic programming over a CKA similarity matrix.

Growing models (L_old ≤ L_new): each old layer i goes to a distinct new layer m(i), strictly
increasing, with the paper's offset constraint 0 ≤ m(i) − i ≤ offset (default L_new − L_old,
which monotonicity already implies), maximising Σ_i S[i, m(i)].

Shrinking models (L_old > L_new): each old layer still goes somewhere, non-decreasing, with
0 ≤ i − m(i) ≤ offset (default L_old − L_new); several old layers may share a new layer and
their transferred deltas are then summed.

Both are O(L_old · L_new²) table fills — trivial next to any forward pass.
"""
from __future__ import annotations

import numpy as np

from .errors import LorasuiteError


def _allowed(i: int, j: int, growing: bool, offset: int) -> bool:
    gap = j - i if growing else i - j
    return 0 <= gap <= offset


def map_layers(similarity: np.ndarray, offset: int | None = None) -> list[tuple[int, int]]:
    """similarity: L_old × L_new -> [(old layer, new layer)] for every old layer."""
    L_old, L_new = similarity.shape
    growing = L_old <= L_new
    offset = abs(L_new - L_old) if offset is None else offset
    if offset < abs(L_new - L_old) and growing:
        raise LorasuiteError(f"layer offset {offset} is smaller than the layer-count difference {L_new - L_old}")
    NEG = -np.inf
    best = np.full((L_old, L_new), NEG)
    back = np.full((L_old, L_new), -1, dtype=np.int64)
    for j in range(L_new):
        if _allowed(0, j, growing, offset):
            best[0, j] = similarity[0, j]
    for i in range(1, L_old):
        for j in range(L_new):
            if not _allowed(i, j, growing, offset):
                continue
            prev = best[i - 1, : j if growing else j + 1]
            if prev.size == 0 or not np.isfinite(prev.max()):
                continue
            k = int(np.argmax(prev))
            best[i, j] = prev[k] + similarity[i, j]
            back[i, j] = k
    if not np.isfinite(best[-1].max()):
        raise LorasuiteError(f"no monotone layer mapping satisfies offset {offset}")
    mapping = [int(np.argmax(best[-1]))]
    for i in range(L_old - 1, 0, -1):
        mapping.append(int(back[i, mapping[-1]]))
    mapping.reverse()
    return list(enumerate(mapping))
