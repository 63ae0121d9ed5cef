"""Minibatch linear CKA between every old and every new layer, all pairs at once.

For a minibatch of n paired tokens and layer representations X_l (n × d), the Gram matrices
K_l = X_l X_lᵀ are stacked (L × n × n) with their diagonals zeroed (K̃). The unbiased HSIC
estimator (Song et al. 2012; used per minibatch by Nguyen et al. 2021) is

    HSIC(K, L) = [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1 ] / (n(n−3))

and every term is a matmul over the stack: tr(K̃L̃) = vec(K̃)·vec(L̃), 1ᵀK̃L̃1 = (K̃1)·(L̃1).
HSIC sums over minibatches; CKA = HSIC_xy / √(HSIC_xx HSIC_yy). A layer whose representation
is identically zero (an inserted identity layer's update) gets CKA 0 with everything.
"""
from __future__ import annotations

import numpy as np
import torch


def _stacked_grams(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X: L × n × d -> (vec K̃: L × n², row sums K̃1: L × n, totals 1ᵀK̃1: L)."""
    K = X @ X.transpose(1, 2)                          # L × n × n
    K.diagonal(dim1=1, dim2=2).zero_()
    rows = K.sum(dim=2)                                # L × n
    return K.flatten(1), rows, rows.sum(dim=1)


def _hsic(a, b, n: int) -> torch.Tensor:
    (Ka, ra, ta), (Kb, rb, tb) = a, b
    trace = Ka @ Kb.T                                  # La × Lb
    totals = torch.outer(ta, tb) / ((n - 1) * (n - 2))
    cross = (ra @ rb.T) * (2.0 / (n - 2))
    return (trace + totals - cross) / (n * (n - 3))


def _self_hsic(a, n: int) -> torch.Tensor:
    K, r, t = a
    return ((K * K).sum(1) + t * t / ((n - 1) * (n - 2)) - (r * r).sum(1) * (2.0 / (n - 2))) / (n * (n - 3))


def minibatch_cka(old: np.ndarray, new: np.ndarray, *, batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """old: L_o × N × d, new: L_n × N × D (paired along N) -> L_o × L_n CKA matrix."""
    if old.shape[1] != new.shape[1]:
        raise ValueError(f"paired activations disagree on token count: {old.shape[1]} vs {new.shape[1]}")
    N = old.shape[1]
    order = np.random.default_rng(seed).permutation(N)
    hxy = torch.zeros(old.shape[0], new.shape[0], dtype=torch.float64)
    hxx = torch.zeros(old.shape[0], dtype=torch.float64)
    hyy = torch.zeros(new.shape[0], dtype=torch.float64)
    for start in range(0, N - 3, batch_size):
        idx = order[start:start + batch_size]
        n = len(idx)
        if n < 4:
            break
        a = _stacked_grams(torch.from_numpy(old[:, idx]).double())
        b = _stacked_grams(torch.from_numpy(new[:, idx]).double())
        hxy += _hsic(a, b, n)
        hxx += _self_hsic(a, n)
        hyy += _self_hsic(b, n)
    denom = torch.sqrt(torch.outer(hxx.clamp(min=0), hyy.clamp(min=0)))
    cka = torch.where(denom > 1e-30 * max(float(denom.max()), 1e-300), hxy / denom.clamp(min=1e-300), torch.zeros_like(hxy))
    return cka.numpy()
