"""Scalable neuron matching (sketched candidates + sparse full matching) and the FLOP counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lorasuite_core.models.loading import Dims
from lorasuite_core.transfer.matching import (match_neurons, neuron_features, neuron_similarity, similarity_flops,
                                     sparse_neuron_match)


def _orthogonal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g))[0]


def upgraded_mlp(n_old, extra, d, gated=True, noise=0.0, seed=0):
    """Old MLP and a new one holding its neurons permuted (gated: up/down sign-flipped together), rotated
    residual, plus ``extra`` unrelated neurons; returns (old_w, new_w, T_in, T_out, perm)."""
    g = torch.Generator().manual_seed(seed)
    old = {"up": torch.randn(n_old, d, generator=g), "down": torch.randn(d, n_old, generator=g)}
    if gated:
        old["gate"] = torch.randn(n_old, d, generator=g)
    R = _orthogonal(d, g)                                    # new residual = R · old residual
    n_new = n_old + extra
    perm = torch.randperm(n_new, generator=g)[:n_old]        # old neuron i -> new neuron perm[i]
    sign = torch.where(torch.rand(n_old, generator=g) < 0.5, -1.0, 1.0) if gated else torch.ones(n_old)
    new = {name: torch.randn(n_new, d, generator=g) for name in ("up", "gate") if name in old}
    new["down"] = torch.randn(d, n_new, generator=g)
    new["up"][perm] = sign[:, None] * old["up"] @ R.T
    new["down"][:, perm] = sign[None, :] * (R @ old["down"])
    if gated:
        new["gate"][perm] = old["gate"] @ R.T
    for w in new.values():
        w += noise * torch.randn(w.shape, generator=g)
    return old, new, R.T, R, perm.numpy()


def dense_match(old, new, T_in, T_out):
    sim = neuron_similarity(old, new, T_in, T_out)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return rows, cols, sim


@pytest.mark.parametrize("gated", [True, False])
def test_scalable_matching_recovers_a_permutation_with_added_neurons(gated):
    old, new, T_in, T_out, perm = upgraded_mlp(4096, 1024, 320, gated=gated, noise=0.02, seed=1)
    pairs, mean = match_neurons(old, new, T_in, T_out, dense_limit=0)    # D = 320 > sketch width: sketched
    assert pairs.dtype == np.int64 and pairs.shape == (4096, 2)
    assert np.array_equal(pairs[:, 0], np.arange(4096)) and np.array_equal(pairs[:, 1], perm)
    assert mean > (3 if gated else 2) - 0.05


def test_sparse_matching_agrees_with_dense_hungarian_at_small_width():
    old, new, T_in, T_out, perm = upgraded_mlp(300, 80, 48, noise=0.4, seed=2)
    rows, cols, sim = dense_match(old, new, T_in, T_out)
    s_rows, s_cols, s_sim = sparse_neuron_match(neuron_features(old, new, T_in, T_out))
    assert np.array_equal(rows, s_rows) and np.array_equal(cols, s_cols)
    assert np.allclose(s_sim, sim[rows, cols], atol=1e-5)
    pairs, mean = match_neurons(old, new, T_in, T_out)                   # small: the dense path itself
    assert np.array_equal(pairs[:, 1], cols) and mean == pytest.approx(float(sim[rows, cols].mean()))


@pytest.mark.parametrize("n_old,n_new", [(200, 260), (260, 200)])
def test_sparse_matching_on_unrelated_weights_is_near_the_dense_optimum(n_old, n_new):
    g = torch.Generator().manual_seed(n_old)
    old = {"gate": torch.randn(n_old, 32, generator=g), "up": torch.randn(n_old, 32, generator=g),
           "down": torch.randn(32, n_old, generator=g)}
    new = {"gate": torch.randn(n_new, 32, generator=g), "up": torch.randn(n_new, 32, generator=g),
           "down": torch.randn(32, n_new, generator=g)}
    T = torch.eye(32)
    rows, cols, sim = dense_match(old, new, T, T)
    parts = neuron_features(old, new, T, T)
    s_rows, s_cols, s_sim = sparse_neuron_match(parts)
    assert len(s_rows) == min(n_old, n_new) == len(set(s_cols.tolist())) == len(set(s_rows.tolist()))
    assert s_sim.sum() >= 0.95 * sim[rows, cols].sum()
    all_rows, all_cols, _ = sparse_neuron_match(parts, k=max(n_old, n_new))   # every edge: the dense optimum
    assert np.isclose(sim[all_rows, all_cols].sum(), sim[rows, cols].sum(), rtol=1e-6)


def test_flop_counts_at_llama_7b_to_8b_shape():
    do = Dims(4096, 32, 32, 32, 128, 11008, 1e-5)
    dn = Dims(4096, 32, 32, 8, 128, 14336, 1e-5)
    flops = similarity_flops(do, dn)
    carry = 2 * 4096 ** 3 * 4
    assert flops["head_similarity"] < flops["official_head"] < flops["official_head_per_pair_forming"]
    assert flops["official_head"] == carry + 4 * 4096 ** 2 * (2 * 4096 + 32 * 32 + 64)
    assert flops["neuron_similarity"] < flops["neuron_similarity_dense"] / 3
