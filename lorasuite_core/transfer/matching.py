"""Attention-head and MLP-neuron matching for one mapped layer pair.

Heads. Query head i of a layer acts through two interaction matrices on the residual stream,
W_QK = W_Qᵢᵀ W_K(g(i)) and W_VO = W_O(:,i) W_V(g(i)) (g: the head's key/value group). The old
ones are carried into the new space by the input map T_in and output map T_out. Their cosine
similarity never needs a D × D matrix: with A = W_Q,old T_in, C = W_Q,new (hd × D),

    ⟨AᵀB, CᵀD⟩_F = Σ_ab (A Cᵀ)_ab (B Dᵀ)_ab

so one matmul of the stacked heads (H_o·hd × H_n·hd) for Q and one for K give every head
pair's inner product; VO is the same with G_O = (T_out O)ᵀ O' and G_V = (V T_in) V'ᵀ.
The key and value Grams depend only on the two heads' kv groups, so they are computed per
kv-head pair (KV_o·hd × KV_n·hd) and shared by all query-head pairs of those groups; T_in is
applied once to the stacked old [W_Q; W_K; W_V] and T_out once to W_O (the old side: the new
weights are used as they are). The same holds for the self norms ‖AᵢᵀB_g(i)‖_F from per-head
hd × hd Grams. The similarities only rank: :func:`match_layer` multiplies in RANKING_DTYPE
(bfloat16, float32 accumulation: about 4× the float32 matmul rate on CPUs with AMX/AVX512-BF16)
and keeps every Gram, norm and sum of products in float32. A carried copy of a unit stays
recognisable: rounding each entry of a row by a relative δ ≈ 2⁻⁹ changes its cosine with the
exact row by O(δ²), and a product's output rounding moves a similarity by ≤ 2⁻⁸ per part, far
below the gap between a copy (1 per part) and unrelated units (≈ 1/√D). The functions called
directly (tests, benchmarks) compute in their inputs' dtype unless given ``dtype``.
Similarity = cos(QK) + cos(VO); the Hungarian algorithm (linear_sum_assignment) picks the
one-to-one head assignment. A new key/value head takes the old group most of its assigned
query heads came from (replicated kv heads thus all point to their source).

Neurons. Neuron f is its gate row, up row (carried by T_in) and down column (carried by
T_out); similarity is cos(gate) + |cos(up)| + |cos(down)| in gated MLPs (flipping up and down
together keeps the function), cos(up) + |cos(down)| otherwise; Hungarian again while
n_o·n_n ≤ DENSE_NEURON_PAIRS. The dense matrix is built from unit rows (carried in the ranking
dtype, normalised in float32) one part at a time; the reported mean similarity of the matched
pairs is recomputed in float32 on those pairs only (row-wise products, no second matrix).

Neurons at scale. The dense Hungarian is O(n³) and the dense n_o × n_n similarity costs
2·n_o·n_n·D per part. Instead, with unit rows u (old, carried) and v (new) per part:

 1. Sketch: one Gaussian R (D × m, m = SKETCH_DIM, fixed seed) for all parts, rows
    re-normalised: ⟨uR, vR⟩ / (‖uR‖‖vR‖) ≈ ⟨u, v⟩ with error O(1/√m) (Johnson–Lindenstrauss);
    a carried copy of a neuron (u = ±v) keeps cos = ±1 exactly.
 2. Candidates: the sketched similarity in blocks of rows of the smaller side (never the whole
    n_o × n_n matrix), keeping each of its neurons' TOP_K best neurons of the other side.
 3. Backstop edges (t, t), t < min(n_o, n_n): a matching saturating the smaller side always
    exists in the candidate graph, so the solver never finds it infeasible.
 4. Exact similarities (unsketched, float32) on the candidate edges only (sampled matrix
    products, torch.sparse.sampled_addmm); the min-weight full
    bipartite matching (scipy's LAPJVsp, min_weight_full_bipartite_matching) with cost
    (parts + 1) − similarity > 0 (every full matching has min(n_o, n_n) edges, so the shift
    does not change the optimum) maximises the total exact similarity over the candidate graph.

An old neuron whose carried copy exists in the new model (permutation, sign flip of up and
down, added unrelated neurons) has similarity = #parts against it and ≈ 0 against others, so
it is its own first candidate and the matching recovers the permutation exactly. On unrelated
weights the result is the best matching within the candidate graph, a lower bound of the dense
optimum: when the true cosines are below the sketch noise (≈ 1/√m per part) the candidates are
close to random, e.g. 4864 × 8960 random neurons at D = 1536 reach a mean similarity of 0.12
against the dense optimum's 0.18 (both noise level). neuron_similarity_mean is the mean exact
similarity of the matched pairs in both paths.

FLOPs (similarity_flops; 2 FLOPs per multiply-add, matmul-like terms only, D_o/D the old/new
hidden sizes, R_q = H·hd and R_kv = KV·hd rows per side, primes for the new model):

    carry (ours and official)  2·D_o·D·(2·R_q + 2·R_kv)          T_in on W_Q, W_K, W_V; T_out on W_O
    ours, cross Grams          2·D·(2·R_q·R'_q + 2·R_kv·R'_kv)    Q, O per head; K, V per kv head
    ours, combine              4·H·H'·hd·hd'                      two Hadamard products summed
    ours, self norms           2·D·(2·H·hd² + 2·KV·hd²) per side  per-head Grams
    official, forming          4·D²·(H·hd + H'·hd')               W_QK = W_Qᵀ W_K (D × hd · hd × D) and
                                                                  W_VO per head, 2·D²·hd each
    official, inner products   4·D²·H·H'                          ⟨·,·⟩_F of two D × D matrices (D² mults
                                                                  + D² adds) for QK and VO per head pair
    official, norms            4·D²·(H + H')                      ‖W_QK‖_F, ‖W_VO‖_F per head

The official formula forms every head's D × D matrices once (a loop that re-formed them for
every head pair would cost 4·D²·H·H'·(hd + hd') for forming instead; reported as
``official_head_per_pair_forming``). Neurons: carry 2·D_o·D·n_o per part; dense
2·n_o·n_n·D per part; sketched 2·(n_o + n_n)·D·m + 2·n_o·n_n·m per part and 2·E·D per part
for the exact similarity of the E ≤ min(n_o, n_n)·(TOP_K + 1) candidate edges. The carry is
what exact cosines need at least (‖u‖ for every carried old row); at d 4096 it dominates.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from lorasuite_core.models.loading import Dims

DENSE_NEURON_PAIRS = 8192 * 8192     # n_o · n_n up to which neurons get the dense Hungarian (Qwen2.5
                                     # 0.5B -> 1.5B, 4864 × 8960, stays dense; Llama 7B -> 8B does not)
TOP_K = 8                            # candidates kept per old and per new neuron
SKETCH_DIM = 256                     # random-projection width for finding candidates


@dataclass
class LayerMatch:
    head_pairs: list[tuple[int, int]]        # (old query head, new query head)
    kv_pairs: list[tuple[int, int]]          # (old kv head, new kv head)
    neuron_pairs: np.ndarray                 # K × 2 (old neuron, new neuron)
    head_similarity: np.ndarray              # H_o × H_n
    neuron_similarity_mean: float            # mean similarity of matched neurons


def _heads(W: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    return W.reshape(n, hd, -1)


def _wide(X: torch.Tensor) -> torch.Tensor:
    """A product's result for sums and norms: half precision widened to float32, else as it is."""
    return X.float() if X.dtype in (torch.bfloat16, torch.float16) else X


def _pair_grams(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A: n_a × hd_a × D, C: n_c × hd_c × D -> n_a × n_c × hd_a × hd_c (at least float32)."""
    return _wide(torch.einsum("iaD,jbD->ijab", A, C))


def _cosine(inner: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    denom = torch.outer(norm_a, norm_b)
    return torch.where(denom > 0, inner / denom.clamp(min=1e-30), torch.zeros_like(inner))


def _self_norm(A: torch.Tensor, B: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """‖AᵢᵀB_g(i)‖_F per head for stacked A (H × hd × D) and kv-level B (KV × hd × D)."""
    GA, GB = _wide(A @ A.transpose(1, 2)), _wide(B @ B.transpose(1, 2))
    return (GA * GB[group]).sum((1, 2)).clamp(min=0).sqrt()


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def head_similarity(old_w, new_w, do: Dims, dn: Dims, T_in, T_out, dtype: torch.dtype | None = None) -> np.ndarray:
    """cos(QK) + cos(VO) of every (old, new) query-head pair (H_o × H_n); products in ``dtype``, sums in
    at least float32."""
    old_w, new_w = _cast(old_w, dtype), _cast(new_w, dtype)
    T_in, T_out = (T_in, T_out) if dtype is None else (T_in.to(dtype), T_out.to(dtype))
    group_o = torch.arange(do.num_heads) // do.heads_per_group
    group_n = torch.arange(dn.num_heads) // dn.heads_per_group
    q_rows, kv_rows = do.num_heads * do.head_dim, do.num_kv_heads * do.head_dim
    carried = torch.cat([old_w["q"], old_w["k"], old_w["v"]]) @ T_in          # T_in once for q, k, v
    Q_o = _heads(carried[:q_rows], do.num_heads, do.head_dim)
    K_o = _heads(carried[q_rows:q_rows + kv_rows], do.num_kv_heads, do.head_dim)
    V_o = _heads(carried[q_rows + kv_rows:], do.num_kv_heads, do.head_dim)
    O_o = _heads((T_out @ old_w["o"]).T, do.num_heads, do.head_dim)          # H × hd × D (columns)
    Q_n = _heads(new_w["q"], dn.num_heads, dn.head_dim)
    K_n = _heads(new_w["k"], dn.num_kv_heads, dn.head_dim)
    V_n = _heads(new_w["v"], dn.num_kv_heads, dn.head_dim)
    O_n = _heads(new_w["o"].T, dn.num_heads, dn.head_dim)
    # key/value Grams per kv-head pair, shared by every query-head pair of the two groups
    kk = _pair_grams(K_o, K_n)[group_o][:, group_n]
    vv = _pair_grams(V_o, V_n)[group_o][:, group_n]
    qk = (_pair_grams(Q_o, Q_n) * kk).sum((2, 3))
    vo = (_pair_grams(O_o, O_n) * vv).sum((2, 3))
    cos_qk = _cosine(qk, _self_norm(Q_o, K_o, group_o), _self_norm(Q_n, K_n, group_n))
    cos_vo = _cosine(vo, _self_norm(O_o, V_o, group_o), _self_norm(O_n, V_n, group_n))
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
    """The dense n_o × n_n neuron similarity, float32, straight from its definition (the reference)."""
    gated = "gate" in old_w and "gate" in new_w
    sim = _row_cosines(old_w["down"].T @ T_out.T, new_w["down"].T).abs()
    up = _row_cosines(old_w["up"] @ T_in, new_w["up"])
    sim += up.abs() if gated else up
    if gated:
        sim += _row_cosines(old_w["gate"] @ T_in, new_w["gate"])
    return sim.numpy()


def dense_similarity(parts, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Σ_parts (|)cos(|) of unit rows (:func:`neuron_features`) as an n_o × n_n float32 matrix, products in ``dtype``."""
    sim = None
    for o, n, absolute in parts:
        term = (o.to(dtype or o.dtype) @ n.to(dtype or n.dtype).T).float()
        if absolute:
            term.abs_()
        sim = term if sim is None else sim.add_(term)
    return sim


def pair_similarity(parts, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Σ_parts (|)cos(|) of the pairs (rows[t], cols[t]) only, float32 row-wise products."""
    r, c = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    total = torch.zeros(len(r))
    for o, n, absolute in parts:
        term = (o[r].float() * n[c].float()).sum(1)
        total += term.abs() if absolute else term
    return total.double().numpy()


# ----------------------------------------------------------------------------- large widths


def _unit(X: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    norm = X.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return X.div_(norm) if inplace else X / norm


def neuron_features(old_w, new_w, T_in, T_out, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """(old rows carried and unit-normalised, new rows unit-normalised, take |cos|) per part; the carry
    multiplies in ``dtype`` (default: the inputs'), the unit rows are float32."""
    old_w, new_w = _cast(old_w, dtype), _cast(new_w, dtype)
    T_in, T_out = (T_in, T_out) if dtype is None else (T_in.to(dtype), T_out.to(dtype))
    gated = "gate" in old_w and "gate" in new_w
    names = ("gate", "up") if gated else ("up",)
    carried = _unit((torch.cat([old_w[n] for n in names]) @ T_in).float(), inplace=True)   # T_in once for gate and up
    parts = [(c, _unit(new_w[n].to(torch.float32, copy=True), inplace=True), n == "up" and gated)
             for c, n in zip(carried.split(old_w["up"].shape[0]), names)]
    # (T_out W_down)ᵀ, not W_downᵀ T_outᵀ: two transposed operands take a slower bf16 GEMM path (≈ 2×)
    parts.append((_unit((T_out @ old_w["down"]).T.float(), inplace=True),
                  _unit(new_w["down"].T.to(torch.float32, copy=True), inplace=True), True))
    return parts


def _sketch(parts, dim: int, seed: int = 0, dtype: torch.dtype | None = None):
    """Project every part onto the same random dim-dimensional subspace, rows re-normalised (JL);
    products and the returned rows in ``dtype`` (default: the parts')."""
    D = parts[0][0].shape[1]
    dtype = dtype or parts[0][0].dtype
    if D <= dim:
        return [(o.to(dtype), n.to(dtype), absolute) for o, n, absolute in parts]
    R = torch.randn(D, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return [(_unit((o.to(dtype) @ R).float()).to(dtype), _unit((n.to(dtype) @ R).float()).to(dtype), absolute)
            for o, n, absolute in parts]


def _top_candidates(parts, k: int, block: int) -> torch.Tensor:
    """Each old row's k best new rows (n_o × k) by Σ_parts (|)cos(|), in blocks of old rows
    (products in the parts' dtype, the sum in float32)."""
    n_o, n_n = parts[0][0].shape[0], parts[0][1].shape[0]
    k = min(k, n_n)
    top = torch.empty(n_o, k, dtype=torch.long)
    sim = torch.empty(min(block, n_o), n_n)
    term = torch.empty(min(block, n_o), n_n, dtype=parts[0][0].dtype)
    for start in range(0, n_o, block):
        rows = slice(start, min(start + block, n_o))
        size = rows.stop - start
        sim[:size].zero_()
        for o, n, absolute in parts:
            out = term[:size]
            torch.matmul(o[rows], n.T, out=out)
            if absolute:
                out.abs_()
            sim[:size].add_(out)
        top[rows] = sim[:size].topk(k, dim=1).indices
    return top


def _edge_similarity(parts, i: np.ndarray, j: np.ndarray, shape) -> np.ndarray:
    """Exact Σ_parts (|)cos(|) on the edges (i, j), sorted row-major: sampled products, no dense matrix."""
    crow = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(i, minlength=shape[0]))]))
    with warnings.catch_warnings():                        # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, torch.from_numpy(j), torch.zeros(len(i)), size=shape,
                                          check_invariants=False)
        total = 0
        for o, n, absolute in parts:
            term = torch.sparse.sampled_addmm(pattern, o, n.T, beta=0.0).values()
            total = total + (term.abs() if absolute else term)
    return total.double().numpy()


def sparse_neuron_match(parts, k: int = TOP_K, sketch_dim: int = SKETCH_DIM, block: int = 2048,
                        dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-similarity full matching on a candidate graph: (old indices, new indices, their similarity);
    the sketch and the candidate search multiply in ``dtype``, the edge similarities are float32."""
    n_o, n_n = parts[0][0].shape[0], parts[0][1].shape[0]
    sketched = _sketch(parts, sketch_dim, dtype=dtype)
    if n_o <= n_n:                                         # candidates for every unit of the smaller side
        top = _top_candidates(sketched, k, block).numpy()                        # n_o × k new neurons
        i, j = np.repeat(np.arange(n_o), top.shape[1]), top.ravel()
    else:
        top = _top_candidates([(n, o, a) for o, n, a in sketched], k, block).numpy()   # n_n × k old neurons
        i, j = top.ravel(), np.repeat(np.arange(n_n), top.shape[1])
    t = np.arange(min(n_o, n_n))                           # backstop (t, t): a full matching always exists
    keys = np.unique(np.concatenate([i * n_n + j, t * n_n + t]))
    i, j = keys // n_n, keys % n_n
    sim = _edge_similarity(parts, i, j, (n_o, n_n))
    cost = (len(parts) + 1.0) - sim                        # > 0 (sim ≤ number of parts); min cost = max sim
    r, c = min_weight_full_bipartite_matching(sp.csr_matrix((cost, (i, j)), shape=(n_o, n_n)))
    return r, c, sim[np.searchsorted(keys, r.astype(np.int64) * n_n + c)]


def match_neurons(old_w, new_w, T_in, T_out, dense_limit: int = DENSE_NEURON_PAIRS,
                  dtype: torch.dtype | None = None):
    """(K × 2 matched (old, new) neurons, their mean similarity); dense Hungarian up to ``dense_limit`` pairs.
    Products in ``dtype`` (default: the inputs'); the matched pairs' similarities in float32."""
    n_o, n_n = old_w["up"].shape[0], new_w["up"].shape[0]
    parts = neuron_features(old_w, new_w, T_in, T_out, dtype)
    if n_o * n_n <= dense_limit:
        rows, cols = linear_sum_assignment(dense_similarity(parts, dtype).numpy(), maximize=True)
        sim = pair_similarity(parts, rows, cols)
    else:
        rows, cols, sim = sparse_neuron_match(parts, dtype=dtype)
    return np.stack([rows, cols], axis=1).astype(np.int64), float(sim.mean()) if len(sim) else 0.0


HEAD_MAPPINGS = ("hungarian", "identity")
RANKING_DTYPE = torch.bfloat16       # the matmul dtype of match_layer's similarities (see the docstring)


def match_layer(old_w, new_w, do: Dims, dn: Dims, maps: dict[str, torch.Tensor],
                head_mapping: str = "hungarian") -> LayerMatch:
    """Heads by the Hungarian algorithm on their similarity (``identity``: head h to head h, the
    paper's ablation without head matching; the similarity is still computed and reported), and
    neurons by :func:`match_neurons`."""
    if head_mapping not in HEAD_MAPPINGS:
        raise ValueError(f"head mapping must be one of {', '.join(HEAD_MAPPINGS)}, not {head_mapping!r}")
    # similarities only rank candidates: bfloat16 products (float32 sums) are ample and ~4x faster
    old_w, new_w, maps = _cast(old_w, RANKING_DTYPE), _cast(new_w, RANKING_DTYPE), _cast(maps, RANKING_DTYPE)
    heads = head_similarity(old_w, new_w, do, dn, maps["attention_input"], maps["attention_output"])
    if head_mapping == "identity":
        head_pairs = [(h, h) for h in range(min(heads.shape))]
    else:
        rows, cols = linear_sum_assignment(heads, maximize=True)
        head_pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
    neuron_pairs, neuron_mean = match_neurons(old_w, new_w, maps["mlp_input"], maps["mlp_output"], dtype=RANKING_DTYPE)
    return LayerMatch(
        head_pairs=head_pairs,
        kv_pairs=_kv_pairs(head_pairs, do, dn, heads),
        neuron_pairs=neuron_pairs,
        head_similarity=heads,
        neuron_similarity_mean=neuron_mean,
    )


def similarity_flops(do: Dims, dn: Dims, gated: bool = True, dense_limit: int = DENSE_NEURON_PAIRS,
                     sketch_dim: int = SKETCH_DIM, top_k: int = TOP_K) -> dict[str, int]:
    """FLOP counts of one layer pair's similarities (derivation in the module docstring)."""
    D_o, D = do.hidden, dn.hidden
    H, Hn, KV, KVn, hd, hdn = do.num_heads, dn.num_heads, do.num_kv_heads, dn.num_kv_heads, do.head_dim, dn.head_dim
    Rq, Rkv, Rqn, Rkvn = H * hd, KV * hd, Hn * hdn, KVn * hdn
    carry = 2 * D_o * D * (2 * Rq + 2 * Rkv)
    ours = (carry + 2 * D * (2 * Rq * Rqn + 2 * Rkv * Rkvn) + 4 * H * Hn * hd * hdn
            + 2 * D * (2 * H * hd ** 2 + 2 * KV * hd ** 2) + 2 * D * (2 * Hn * hdn ** 2 + 2 * KVn * hdn ** 2))
    forming = 4 * D ** 2 * (Rq + Rqn)
    official_rest = 4 * D ** 2 * H * Hn + 4 * D ** 2 * (H + Hn)
    n_o, n_n, parts = do.intermediate, dn.intermediate, 3 if gated else 2
    neuron_carry = 2 * D_o * D * n_o * parts
    if n_o * n_n <= dense_limit or D <= sketch_dim:
        neurons = neuron_carry + 2 * n_o * n_n * D * parts
    else:
        edges = min(n_o, n_n) * (top_k + 1)
        neurons = (neuron_carry
                   + parts * (2 * (n_o + n_n) * D * sketch_dim + 2 * n_o * n_n * sketch_dim + 2 * edges * D))
    return {
        "head_similarity": ours,
        "neuron_similarity": neurons,
        "neuron_similarity_dense": neuron_carry + 2 * n_o * n_n * D * parts,
        "official_head": carry + forming + official_rest,
        "official_head_per_pair_forming": carry + 4 * D ** 2 * H * Hn * (hd + hdn) + official_rest,
    }
