"""Re-factorising a transferred delta into LoRA factors by truncated SVD.

PEFT computes ΔW = s · B A with s = alpha / r (alpha / √r under rsLoRA). Keeping r and alpha
keeps s, so the factors come from ΔW / s = U Σ Vᵀ (float64):

    B = U_r √Σ_r  (out × r),   A = √Σ_r V_rᵀ  (r × in)

The relative Frobenius residual ‖ΔW − s B A‖ / ‖ΔW‖ is reported: zero up to rounding when the
transfer kept rank ≤ r (always true for a one-to-one transfer), positive when several old
layers were summed into one new layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refactorised:
    A: torch.Tensor      # r × in, float32
    B: torch.Tensor      # out × r, float32
    residual: float


def refactorise(delta: torch.Tensor, rank: int, scaling: float) -> Refactorised:
    target = delta.double() / scaling
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B[:, :r] = U[:, :r] * root
    A[:r] = root[:, None] * Vh[:r]
    norm = float(target.norm())
    residual = float((target - B @ A).norm()) / norm if norm > 0 else 0.0
    return Refactorised(A=A.float(), B=B.float(), residual=residual)
