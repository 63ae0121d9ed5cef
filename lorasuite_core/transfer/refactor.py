"""Re-factorising a transferred delta into LoRA factors, in factor space.

PEFT computes ΔW = s · B A with s = alpha / r (alpha / √r under rsLoRA). Keeping r and alpha
keeps s, so the factors come from the SVD ΔW / s = U Σ Vᵀ (float64):

    B = U_r √Σ_r  (out × r),   A = √Σ_r V_rᵀ  (r × in)

Factor form. A carried delta is never formed as a dense out × in matrix: it is kept as
ΔW = L R (:class:`LowRank`, L out × k, R k × in, float64). The old adapter's module is
L = s_old B_old, R = A_old (k = r); the transfer multiplies L on the left and R on the right
(transfer.py); a sum of several carried deltas concatenates the factors,

    L₁R₁ + L₂R₂ = [L₁ L₂] [R₁; R₂]          (k = k₁ + k₂),

and a fused module (query_key_value) stacks its parts' rows with the lefts in disjoint column
blocks (migrate.py). With the thin QR decompositions L = Q_L R_L and Rᵀ = Q_R R_R (Q_L, Q_R
with orthonormal columns, R_L, R_R at most k × k),

    ΔW / s = Q_L C Q_Rᵀ,    C = R_L R_Rᵀ / s,    C = U_c Σ V_cᵀ   (SVD of the small core)

so ΔW / s = (Q_L U_c) Σ (Q_R V_c)ᵀ is itself an SVD of ΔW / s (products of orthonormal columns
are orthonormal): the singular values are the core's and

    B = Q_L U_c,r √Σ_r,   A = √Σ_r V_c,rᵀ Q_Rᵀ.

Q_L and Q_R are isometries, so ‖ΔW / s‖_F = ‖Σ‖ and, by Eckart–Young, the relative Frobenius
residual of the truncation is

    ‖ΔW − s B A‖_F / ‖ΔW‖_F = √(Σ_{i>r} σᵢ²) / √(Σᵢ σᵢ²),

read off the discarded singular values: zero when the transfer kept rank ≤ r (always for a
one-to-one transfer, where k = r), positive when several old layers summed onto one new layer
give a rank-(k·r) core. A zero delta gives residual 0 and zero factors; fewer than r singular
values leave the remaining factor rows/columns zero. Cost O((out + in) k²) + O(k³) instead of
the dense SVD's O(out · in · min(out, in)). Singular vectors are unique only up to sign (and a
rotation inside repeated singular values), so A and B may differ from a dense SVD's; s B A
does not (whenever σ_r > σ_{r+1}).

A dense ΔW (``refactorise`` of a tensor) takes the core C = ΔW / s directly.

AdaLoRA (``singular_values=True``). PEFT's SVDLinear holds ΔW = c P diag(E) Q with P = lora_B,
E = lora_E (r × 1), Q = lora_A and c = alpha / (init_r + 1e-5); the same truncated SVD gives
that parameterisation directly, B = U_r, E = Σ_r, A = V_rᵀ (P, Q with orthonormal columns /
rows, as AdaLoRA's orthogonality regulariser wants them), with the same residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refactorised:
    A: torch.Tensor      # r × in, float32
    B: torch.Tensor      # out × r, float32
    residual: float
    E: torch.Tensor | None = None    # AdaLoRA's singular values (r × 1, float32): ΔW = s B diag(E) A

    def delta(self, scaling: float) -> torch.Tensor:
        """The dense ΔW PEFT applies (float64): s B A, or s B diag(E) A."""
        A = self.A.double() if self.E is None else self.E.double() * self.A.double()
        return scaling * (self.B.double() @ A)


@dataclass(frozen=True)
class LowRank:
    """ΔW = left @ right: left out × k, right k × in (float64)."""
    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def of_lora(cls, B: torch.Tensor, A: torch.Tensor, scaling: float) -> "LowRank":
        return cls(scaling * B.double(), A.double())

    @classmethod
    def of_dense(cls, delta: torch.Tensor) -> "LowRank":
        return cls(delta.double(), torch.eye(delta.shape[1], dtype=torch.float64))

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def __add__(self, other: "LowRank") -> "LowRank":
        return LowRank(torch.cat([self.left, other.left], dim=1), torch.cat([self.right, other.right], dim=0))

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def norm(self) -> float:
        """‖L R‖_F = √⟨LᵀL, R Rᵀ⟩_F (two k × k Grams)."""
        gram = ((self.left.T @ self.left) * (self.right @ self.right.T)).sum()
        return float(gram.clamp(min=0).sqrt())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x = L (R x)."""
        return self.left @ (self.right @ x)


def refactorise(delta: torch.Tensor | LowRank, rank: int, scaling: float, *,
                singular_values: bool = False) -> Refactorised:
    if isinstance(delta, LowRank):
        Q_L, R_L = torch.linalg.qr(delta.left.double())
        Q_R, R_R = torch.linalg.qr(delta.right.double().T)
        core = R_L @ R_R.T / scaling
    else:
        core = delta.double() / scaling
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    if isinstance(delta, LowRank):
        U, Vh = Q_L @ U, Vh @ Q_R.T
    return _truncated(U, S, Vh, rank, delta.shape, singular_values)


def _truncated(U, S, Vh, rank: int, shape, singular_values: bool = False) -> Refactorised:
    r = min(rank, S.numel())
    root = torch.ones_like(S[:r]) if singular_values else S[:r].sqrt()
    B = torch.zeros(shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, shape[1], dtype=torch.float64)
    B[:, :r] = U[:, :r] * root
    A[:r] = root[:, None] * Vh[:r]
    total = float(S.norm())
    residual = float(S[r:].norm()) / total if total > 0 else 0.0
    E = None
    if singular_values:
        E = torch.zeros(rank, 1, dtype=torch.float64)
        E[:r, 0] = S[:r]
        E = E.float()
    return Refactorised(A=A.float(), B=B.float(), residual=residual, E=E)
