"""DoRA: carrying the magnitude vector so the migrated effective weight matches the carried old one.

PEFT's DoRA module (``DoraLinearLayer``) with base weight W (out × in), LoRA delta
ΔW = s B A and magnitude m (out,) computes with the effective weight

    W' = diag(m / n) C,    C = W + ΔW,    n_o = ‖C_o‖₂ (row o of C, norm over the input
                                            dimension: ``get_weight_norm``, ``dim=1``)

so the change it makes to the base layer is E = W' − W = diag(m/n − 1) W + diag(m/n) ΔW.

Carrying. The LoRA delta travels as for plain LoRA (unit_maps.LayerTransfer, factor form). Per
canonical role the transfer is one linear map 𝒯(X) = Λ X Ρ (Λ the unit maps M or the residual
output map T_out on the left, Ρ the residual input map T_in or the unit maps N on the right),
with 𝒯(W_old) = W_new on matched units under a function-preserving upgrade. The old effective
change is carried by the same map, and the carried old effective weight of the new module is

    V = W_new + Σ_i 𝒯_i(E_i)             (sum over the old layers i mapped onto this layer)

— for one source under an exact upgrade V = 𝒯(W'_old) on matched rows, and V = W_new on
rows of unmatched new units (which receive no LoRA delta either). 𝒯(E) is formed densely
(it is a full-rank out × in matrix, the size of the base weight), but never through an
identity of the unit side: an input-facing role is carried as the factor pair (E, I_d), an
output-facing role as (I_d, E), d the residual width.

The new magnitude. With the migrated module's C' = W_new + ΔW_new (ΔW_new = s B A from the
re-factorised float32 factors, what PEFT will apply) and its unit rows D_o = C'_o / ‖C'_o‖,
PEFT's new effective weight is diag(m') D. Rows decouple in ‖diag(m') D − V‖_F², and the least
squares magnitude is the projection of each carried row on the new direction

    m'_o = argmin_μ ‖μ D_o − V_o‖² = ⟨D_o, V_o⟩ / ‖D_o‖² = ⟨D_o, V_o⟩.

Exactness. If Λ acts on rows monomially (each new output row a multiple of one old row:
permuted or replicated heads and neurons, added units, a permutation or signed permutation of
the residual, identity layers, vocabulary changes), then 𝒯(diag(g) C) = diag(g̃) 𝒯(C) with g̃
the carried row gains: every carried row V_o is parallel to C'_o, so m'_o = ‖V_o‖ and
diag(m') D = V exactly. Input-facing roles (q, k, v, gate, up) have such Λ under every
change of the upgrade generator (a residual rotation acts on Ρ = T_in, which keeps rows
rows). Under a rotation Q of the residual stream the output-facing roles (o, down) have
Λ = Q: 𝒯(diag(g) C) = Q diag(g) C N is not a row scaling of Q C N unless g is constant, and the
best magnitude leaves the residual reported per module,

    relative_to_weight = ‖diag(m') D − V‖_F / ‖V‖_F,
    relative_to_change = ‖diag(m') D − V‖_F / ‖V − W_new‖_F      (against the carried DoRA change).

A row with C'_o = 0 (e.g. a zero residual dimension added by widening, with no delta on it)
makes PEFT divide 0 by 0: refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.transfer.refactor import LowRank
from lorasuite_core.transfer.unit_maps import INPUT_ROLES


def row_norms(C: torch.Tensor) -> torch.Tensor:
    """‖C_o‖₂ per output row (PEFT's ``get_weight_norm``)."""
    return torch.linalg.vector_norm(C, dim=1)


def effective_change(W: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """E = diag(m/n) (W + ΔW) − W, the change a DoRA module makes to its base weight (float64)."""
    C = W.double() + delta.double()
    gain = magnitude.double() / row_norms(C)
    return gain[:, None] * C - W.double()


def carry_dense(transfer, role: str, X: torch.Tensor) -> torch.Tensor:
    """𝒯(X) for a full-rank X through a LayerTransfer, the identity on the residual side only."""
    if role in INPUT_ROLES:
        pair = LowRank(X.double(), torch.eye(X.shape[1], dtype=torch.float64))
    else:
        pair = LowRank(torch.eye(X.shape[0], dtype=torch.float64), X.double())
    return transfer.run({role: pair})[role].dense()


@dataclass(frozen=True)
class MagnitudeFit:
    magnitude: torch.Tensor          # (out,) float32
    relative_to_weight: float
    relative_to_change: float

    def report(self) -> dict[str, float]:
        return {"relative_to_weight": self.relative_to_weight, "relative_to_change": self.relative_to_change}


def fit_magnitude(W_new: torch.Tensor, delta_new: torch.Tensor, target: torch.Tensor, module: str) -> MagnitudeFit:
    """m'_o = ⟨D_o, V_o⟩ with D the unit rows of W_new + ΔW_new, V the carried old effective weight."""
    if W_new.shape != delta_new.shape or W_new.shape != target.shape:
        raise LorasuiteError(f"DoRA {module}: base weight {tuple(W_new.shape)}, delta {tuple(delta_new.shape)} and "
                             f"carried weight {tuple(target.shape)} differ in shape")
    C = W_new.double() + delta_new.double()
    norms = row_norms(C)
    zero = int((norms == 0).sum())
    if zero:
        raise LorasuiteError(f"DoRA {module}: {zero} output rows of the new weight (with the migrated delta) are all "
                             "zero, and PEFT's DoRA divides by their norm")
    D = C / norms[:, None]
    m = (D * target.double()).sum(dim=1)
    m32 = m.float()
    err = float((m32.double()[:, None] * D - target.double()).norm())
    change = float((target.double() - W_new.double()).norm())
    scale = float(target.double().norm())
    return MagnitudeFit(m32, err / scale if scale > 0 else 0.0, err / change if change > 0 else 0.0)
