"""Attention-head and MLP-neuron matching for one mapped layer pair.

Heads. Query head i of a layer acts through two interaction matrices on the residual stream,
W_QK = W_Qᵢᵀ W_K(g(i)) and W_VO = W_O(:,i) W_V(g(i)) (g: the head's key/value group). The old
ones are carried into the new space by the input map T_in and output map T_out. Their cosine
similarity never needs a D × D matrix: with A = W_Q,old T_in, C = W_Q,new (hd × D),

    ⟨AᵀB, CᵀD⟩_F = Σ_ab (A Cᵀ)_ab (B Dᵀ)_ab

so one matmul of the stacked heads (H_o·hd × H_n·hd) for Q and one for K give every head
pair's inner product; VO is the same with G_O = (T_out O)ᵀ O' and G_V = (V T_in) V'ᵀ.
Similarity = cos(QK) + cos(VO); the Hungarian algorithm (linear_sum_assignment) picks the
one-to-one head assignment. A new key/value head takes the old group most of its assigned
query heads came from (replicated kv heads thus all point to their source).

Neurons. Neuron f is its gate row, up row (carried by T_in) and down column (carried by
T_out); similarity is cos(gate) + |cos(up)| + |cos(down)| in gated MLPs (flipping up and down
together keeps the function), cos(up) + |cos(down)| otherwise; Hungarian again.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .loading import Dims


@dataclass
class LayerMatch:
    head_pairs: list[tuple[int, int]]        # (old query head, new query head)
    kv_pairs: list[tuple[int, int]]          # (old kv head, new kv head)
    neuron_pairs: np.ndarray                 # K × 2 (old neuron, new neuron)
    head_similarity: np.ndarray              # H_o × H_n
    neuron_similarity_mean: float            # mean similarity of matched neurons


def _heads(W: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    return W.reshape(n, hd, -1)


def _pair_grams(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A: n_a × hd_a × D, C: n_c × hd_c × D -> n_a × n_c × hd_a × hd_c."""
    return torch.einsum("iaD,jbD->ijab", A, C)


def _cosine(inner: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    denom = torch.outer(norm_a, norm_b)
    return torch.where(denom > 0, inner / denom.clamp(min=1e-30), torch.zeros_like(inner))


def _self_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖AᵢᵀBᵢ‖_F per head for stacked A, B (n × hd × D)."""
    GA, GB = A @ A.transpose(1, 2), B @ B.transpose(1, 2)
    return (GA * GB).sum((1, 2)).clamp(min=0).sqrt()


def head_similarity(old_w, new_w, do: Dims, dn: Dims, T_in, T_out) -> np.ndarray:
    group_o = torch.arange(do.num_heads) // do.heads_per_group
    group_n = torch.arange(dn.num_heads) // dn.heads_per_group
    Q_o = _heads(old_w["q"] @ T_in, do.num_heads, do.head_dim)
    K_o = _heads(old_w["k"] @ T_in, do.num_kv_heads, do.head_dim)[group_o]
    V_o = _heads(old_w["v"] @ T_in, do.num_kv_heads, do.head_dim)[group_o]
    O_o = _heads((T_out @ old_w["o"]).T, do.num_heads, do.head_dim)          # H × hd × D (columns)
    Q_n = _heads(new_w["q"], dn.num_heads, dn.head_dim)
    K_n = _heads(new_w["k"], dn.num_kv_heads, dn.head_dim)[group_n]
    V_n = _heads(new_w["v"], dn.num_kv_heads, dn.head_dim)[group_n]
    O_n = _heads(new_w["o"].T, dn.num_heads, dn.head_dim)
    qk = (_pair_grams(Q_o, Q_n) * _pair_grams(K_o, K_n)).sum((2, 3))
    vo = (_pair_grams(O_o, O_n) * _pair_grams(V_o, V_n)).sum((2, 3))
    cos_qk = _cosine(qk, _self_norm(Q_o, K_o), _self_norm(Q_n, K_n))
    cos_vo = _cosine(vo, _self_norm(O_o, V_o), _self_norm(O_n, V_n))
    return (cos_qk + cos_vo).numpy()


def _kv_pairs(head_pairs, do: Dims, dn: Dims, similarity: np.ndarray) -> list[tuple[int, int]]:
    votes: dict[int, Counter] = {}
    for i, j in head_pairs:
        votes.setdefault(j // dn.heads_per_group, Counter())[i // do.heads_per_group] += 1 + similarity[i, j]
    return sorted((counter.most_common(1)[0][0], new_kv) for new_kv, counter in votes.items())


def _row_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Rows of A (n_a × D) against rows of B (n_b × D)."""
    na, nb = A.norm(dim=1), B.norm(dim=1)
    return _cosine(A @ B.T, na, nb)


def neuron_similarity(old_w, new_w, T_in, T_out) -> np.ndarray:
    gated = "gate" in old_w and "gate" in new_w
    sim = _row_cosines(old_w["down"].T @ T_out.T, new_w["down"].T).abs()
    up = _row_cosines(old_w["up"] @ T_in, new_w["up"])
    sim += up.abs() if gated else up
    if gated:
        sim += _row_cosines(old_w["gate"] @ T_in, new_w["gate"])
    return sim.numpy()


def match_layer(old_w, new_w, do: Dims, dn: Dims, maps: dict[str, torch.Tensor]) -> LayerMatch:
    # similarities only rank candidates: float32 is ample and several times faster than float64
    old_w = {k: v.float() for k, v in old_w.items()}
    new_w = {k: v.float() for k, v in new_w.items()}
    maps = {k: v.float() for k, v in maps.items()}
    heads = head_similarity(old_w, new_w, do, dn, maps["attention_input"], maps["attention_output"])
    rows, cols = linear_sum_assignment(heads, maximize=True)
    head_pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
    neurons = neuron_similarity(old_w, new_w, maps["mlp_input"], maps["mlp_output"])
    n_rows, n_cols = linear_sum_assignment(neurons, maximize=True)
    return LayerMatch(
        head_pairs=head_pairs,
        kv_pairs=_kv_pairs(head_pairs, do, dn, heads),
        neuron_pairs=np.stack([n_rows, n_cols], axis=1),
        head_similarity=heads,
        neuron_similarity_mean=float(neurons[n_rows, n_cols].mean()),
    )
