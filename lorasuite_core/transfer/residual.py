"""Residual-stream transfer matrices and the input/output maps each projection sees.

Let E_o (n × d) and E_n (n × D) be what the first layer receives for the n shared tokens
(embedding rows times the family's embedding scale, through its embedding norm where it has
one, e.g. BLOOM's word_embeddings_layernorm). Least squares in float64 gives

    P (d × D):  x_old ≈ P x_new      from  E_n Pᵀ ≈ E_o   (rank ≤ min(d, D), minimum norm)
    Q (D × d):  x_new ≈ Q x_old      from  E_o Qᵀ ≈ E_n

When the new residual stream is the old one rotated, permuted, sign-flipped, zero-widened or
scaled (x_new = c·R x_old, RᵀR = I), P = Rᵀ/c and Q = c·R exactly.

A projection after a norm does not see the residual stream but u = g ⊙ x / rms(x) (LayerNorm:
centred, divided by the standard deviation, plus a bias). Norms are invariant to the residual
scale, so the map between normalised inputs uses the scale-free P̂ = P / s, with
s² = Σ‖P e_n‖² / Σ‖e_n‖² over the shared embeddings, and the change of width d → D multiplies
1/rms by √(D/d):

    T_in = diag(g_o) · P̂ · diag(g_n)⁺ · √(d/D)            u_old ≈ T_in u_new      (d × D)

This is exact whenever the new norm weights are the old ones carried along (folded into the
following linears or not). LayerNorm biases leave an offset c = b_o − T_in b_n that a LoRA
without bias cannot carry; it is reported.

An output-facing projection (o, down) writes into the residual stream, x_new ≈ Q x_old, or —
in families with a norm after the sub-block — into the input of that post-norm, whose map is

    T_out = diag(g_n)⁺ · Q̂ · diag(g_o)                   y_new ∝ T_out y_old      (D × d)

Its overall scale is immaterial: the per-head / per-neuron least-squares maps absorb it.

Cost. Only the rows of the n ≤ MAX_FIT_TOKENS fitted tokens are gathered (in the checkpoint's
dtype) and turned into float64 first-layer inputs (``LoadedModel.effective_embeddings(ids)``): never the
vocab × hidden float64 matrices (151,936 × 1,536 · 8 bytes = 1.9 GB for Qwen2.5-1.5B). They are read
FIT_CHUNK rows at a time, never all n at once (n × (d + D) float64 is 0.64 GB for the Qwen pair, and
the fits and their differences three times that). A first pass sums the three Grams over the chunks,
G_n = Σ E_nᵀE_n (D × D), G_o = Σ E_oᵀE_o (d × d) and C = Σ E_nᵀE_o (D × d), in float64
(n·(D² + d² + D·d) multiply-adds), and both solves use them. A second pass reads the same rows
again and accumulates the squared norms of E_n Pᵀ − E_o, E_o Qᵀ − E_n, E_n Pᵀ, E_o and E_n
(n·2·D·d) for the residuals and the scale. Peak memory is the Grams plus one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import LoadedModel
from lorasuite_core.transfer.vocab import SharedVocabulary

TINY_GAIN = 1e-12
MAX_FIT_TOKENS = 32768
FIT_CHUNK = 4096
FIT_VERSION = 2     # part of the transfer_matrix stage key: 2 = Grams summed over row chunks


@dataclass(frozen=True)
class ResidualTransfer:
    P: torch.Tensor          # d × D, float64: old ≈ P · new
    Q: torch.Tensor          # D × d, float64: new ≈ Q · old
    scale: float             # s: ‖P e_n‖ / ‖e_n‖ on the shared embeddings
    fit_residual_old: float  # ‖E_n Pᵀ − E_o‖ / ‖E_o‖
    fit_residual_new: float  # ‖E_o Qᵀ − E_n‖ / ‖E_n‖


def _lstsq_rank_limited(gram: torch.Tensor, cross: torch.Tensor, rank: int) -> torch.Tensor:
    """Minimum-norm argmin ‖A X − B‖ over A's top ``rank`` principal directions (float64), given
    ``gram`` = AᵀA and ``cross`` = AᵀB.

    A map between a d- and a D-dimensional stream has rank ≤ min(d, D). Limiting the solve to
    that many directions drops the rounding noise a float32/bf16 checkpoint leaves in the
    directions a widened stream never uses — plain pinv would fit that noise. Solved through
    the small Gram matrix AᵀA = V Λ Vᵀ: X = V_k Λ_k⁻¹ V_kᵀ AᵀB (n × D work once, then D × D).
    """
    eigenvalues, V = torch.linalg.eigh(gram)                     # ascending
    eigenvalues, V = eigenvalues.flip(0), V.flip(1)
    keep = min(rank, int((eigenvalues > eigenvalues[0] * 1e-14).sum()))
    V_k = V[:, :keep]
    return V_k @ ((V_k.T @ cross) / eigenvalues[:keep, None])


def residual_transfer(old: LoadedModel, new: LoadedModel, shared: SharedVocabulary) -> ResidualTransfer:
    d = old.dims.hidden
    if len(shared) < d:
        raise LorasuiteError(
            f"only {len(shared)} tokens are shared between the two vocabularies, fewer than the old "
            f"hidden size {d}: the residual-stream transfer matrix would be underdetermined"
        )
    n = min(len(shared), MAX_FIT_TOKENS)   # ids are in merge order: the most frequent tokens come first
    chunks = [(shared.old_ids[s:s + FIT_CHUNK], shared.new_ids[s:s + FIT_CHUNK]) for s in range(0, n, FIT_CHUNK)]
    D = new.dims.hidden
    G_n = torch.zeros(D, D, dtype=torch.float64)
    G_o = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(D, d, dtype=torch.float64)
    for old_ids, new_ids in chunks:
        e_o, e_n = old.effective_embeddings(old_ids), new.effective_embeddings(new_ids)   # rows × d, rows × D
        G_n += e_n.T @ e_n
        G_o += e_o.T @ e_o
        cross += e_n.T @ e_o
    rank = min(d, D)
    # contiguous: a transposed view multiplies in another BLAS order than the same matrix
    # reloaded from disk, and the pipeline must reproduce the sequential run bit for bit
    P = _lstsq_rank_limited(G_n, cross, rank).T.contiguous()                 # d × D
    Q = _lstsq_rank_limited(G_o, cross.T.contiguous(), rank).T.contiguous()  # D × d
    sq = dict.fromkeys(("miss_old", "miss_new", "fit_old", "old", "new"), 0.0)
    for old_ids, new_ids in chunks:
        e_o, e_n = old.effective_embeddings(old_ids), new.effective_embeddings(new_ids)
        fit_old, fit_new = e_n @ P.T, e_o @ Q.T
        for name, t in (("miss_old", fit_old - e_o), ("miss_new", fit_new - e_n), ("fit_old", fit_old),
                        ("old", e_o), ("new", e_n)):
            sq[name] += float(t.square().sum())
    return ResidualTransfer(
        P=P,
        Q=Q,
        scale=(sq["fit_old"] / sq["new"]) ** 0.5,
        fit_residual_old=(sq["miss_old"] / sq["old"]) ** 0.5,
        fit_residual_new=(sq["miss_new"] / sq["new"]) ** 0.5,
    )


def _inverse_gain(g: torch.Tensor) -> torch.Tensor:
    safe = torch.where(g.abs() > TINY_GAIN, g, torch.ones_like(g))
    return torch.where(g.abs() > TINY_GAIN, 1.0 / safe, torch.zeros_like(g))


def input_map(rt: ResidualTransfer, g_old: torch.Tensor | None, g_new: torch.Tensor | None) -> torch.Tensor:
    """T_in (d × D): normalised input of the new projection -> that of the old one."""
    d, D = rt.P.shape
    T = rt.P / rt.scale * (d / D) ** 0.5
    if g_old is not None:
        T = g_old[:, None] * T
    if g_new is not None:
        T = T * _inverse_gain(g_new)[None, :]
    return T


def output_map(rt: ResidualTransfer, g_old: torch.Tensor | None, g_new: torch.Tensor | None) -> torch.Tensor:
    """T_out (D × d): old output space of an o/down projection -> the new one."""
    if g_old is None and g_new is None:
        return rt.Q
    T = rt.Q * rt.scale
    if g_old is not None:
        T = T * g_old[None, :]
    if g_new is not None:
        T = _inverse_gain(g_new)[:, None] * T
    return T


def input_offset(T_in: torch.Tensor, b_old: torch.Tensor | None, b_new: torch.Tensor | None) -> torch.Tensor | None:
    """c = b_o − T_in b_n: the part of the old normed input a linear map of the new one misses."""
    if b_old is None and b_new is None:
        return None
    c = b_old.clone() if b_old is not None else torch.zeros(T_in.shape[0], dtype=T_in.dtype)
    if b_new is not None:
        c = c - T_in @ b_new
    return c
