"""Carrying one layer's LoRA deltas into the new model.

Every projection has a residual-facing side, whose map comes from the residual analysis
(T_in for q/k/v/gate/up inputs, T_out for o/down outputs), and a unit side (a head's
dimensions, a neuron). For a matched unit pair the unit-side map is solved by least squares
against the two base models' weights (float64), and the old delta is carried through both:

    input-facing  (rows of unit a -> rows of unit b):
        W̃ = W_old[a] T_in,  M = W_new[b] W̃⁺            ΔW_new[b] = M ΔW_old[a] T_in
    output-facing (columns of unit a -> columns of unit b):
        W̃ = T_out W_old[:, a],  N = W̃⁺ W_new[:, b]       ΔW_new[:, b] = T_out ΔW_old[:, a] N

If the new weights are exactly the old ones carried by some unit map (a permutation, a sign,
a scale, a replication, a rotation of the residual stream, folded norms…) the least squares
recover that map and the transfer is exact; ``fit`` reports ‖W_new − M W̃‖ / ‖W_new‖ per module.
Units of the new model left unmatched (extra heads or neurons) receive no delta.

``mode="paper"`` reproduces LoRASuite's Eq. 3 instead: with W_h = P (the residual transfer
matrix) the unit map is the un-normalised product M = (W_old W_h W_newᵀ)ᵀ, i.e.
ΔW_new[b] = (W_old[a] P W_new[b]ᵀ)ᵀ ΔW_old[a] P for heads, the transposed analogue for
output-facing modules and the scalar analogue for neurons. It is not exact: W_old W_oldᵀ ≠ I.

Factor form. Deltas travel as ΔW = L R (refactor.LowRank, L out × k, R k × in); both
formulas above multiply ΔW only on the left and on the right, so each acts on one factor:

    input-facing   ΔW_new[b] = (M L[a]) (R T_in)        L_new[b] = M L[a],   R_new = R T_in
    output-facing  ΔW_new[:, b] = (T_out L) (R[:, a] N)  L_new = T_out L,     R_new[:, b] = R[:, a] N

(unmatched new units get zero rows of L_new / zero columns of R_new). The unit maps M, N come
from the base weights exactly as before; only the k columns of a factor are carried instead
of the D columns of a dense delta, and no out × in matrix is formed. ``mode="paper"`` is the
same left/right product with M = (W_old W_h W_newᵀ)ᵀ. A dense delta given to :meth:`run` is
carried as L = ΔW, R = I and returned dense (a reference path for tests).
"""
from __future__ import annotations

import torch

from lorasuite_core.models.loading import Dims
from lorasuite_core.transfer.matching import LayerMatch
from lorasuite_core.transfer.refactor import LowRank

INPUT_ROLES = ("q", "k", "v", "gate", "up")
OUTPUT_ROLES = ("o", "down")
MODES = ("lstsq", "paper")


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.norm())
    return float(err.norm()) / scale if scale > 0 else 0.0


def _unit_rows(W: torch.Tensor, n: int) -> torch.Tensor:
    return W.reshape(n, -1, W.shape[-1])


class LayerTransfer:
    """Transfers the canonical deltas of one (old layer, new layer) pair."""

    def __init__(self, old_w, new_w, do: Dims, dn: Dims, maps, match: LayerMatch, mode: str, P: torch.Tensor):
        self.old_w, self.new_w, self.do, self.dn = old_w, new_w, do, dn
        self.maps, self.match, self.mode, self.P = maps, match, mode, P
        self.fit: dict[str, float] = {}

    def _in_map(self, role: str) -> torch.Tensor:
        if self.mode == "paper":
            return self.P
        return self.maps["attention_input" if role in ("q", "k", "v") else "mlp_input"]

    def _out_map(self, role: str) -> torch.Tensor:
        if self.mode == "paper":
            return self.P.T
        return self.maps["attention_output" if role == "o" else "mlp_output"]

    def _unit_pairs(self, role: str) -> list[tuple[int, int]]:
        if role in ("q", "o"):
            return self.match.head_pairs
        if role in ("k", "v"):
            return self.match.kv_pairs
        return [tuple(p) for p in self.match.neuron_pairs.tolist()]

    def _unit_counts(self, role: str) -> tuple[int, int]:
        if role in ("q", "o"):
            return self.do.num_heads, self.dn.num_heads
        if role in ("k", "v"):
            return self.do.num_kv_heads, self.dn.num_kv_heads
        return self.do.intermediate, self.dn.intermediate

    def _carry(self, role: str, X_o: torch.Tensor, X_n: torch.Tensor, F_o: torch.Tensor) -> torch.Tensor:
        """Units as rows: X_o (n_o × h_o × D), X_n (n_n × h_n × D), factor F_o (n_o × h_o × k) -> n_n × h_n × k."""
        pairs = torch.as_tensor(self._unit_pairs(role), dtype=torch.long).reshape(-1, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        old_units = X_o[a]
        M = X_n[b] @ old_units.transpose(1, 2)                # K × h_n × h_o   (paper: stop here)
        if self.mode == "lstsq":
            # W̃⁺ = W̃ᵀ (W̃ W̃ᵀ)⁺ for each unit: an h × h pseudo-inverse instead of an h × D SVD
            gram = old_units @ old_units.transpose(1, 2)
            M = M @ torch.linalg.pinv(gram, hermitian=True, rtol=1e-12)
        out = torch.zeros(X_n.shape[0], X_n.shape[1], F_o.shape[-1], dtype=F_o.dtype)
        out[b] = M @ F_o[a]
        self.fit[role] = _rel(X_n[b] - M @ old_units, X_n[b])
        return out

    def input_facing(self, role: str, delta: LowRank) -> LowRank:
        T = self._in_map(role)
        n_o, n_n = self._unit_counts(role)
        left = self._carry(
            role,
            _unit_rows(self.old_w[role] @ T, n_o),
            _unit_rows(self.new_w[role], n_n),
            _unit_rows(delta.left, n_o),
        )
        return LowRank(left.reshape(self.new_w[role].shape[0], -1), delta.right @ T)

    def output_facing(self, role: str, delta: LowRank) -> LowRank:
        T = self._out_map(role)
        n_o, n_n = self._unit_counts(role)
        right_t = self._carry(                                # columns handled as rows
            role,
            _unit_rows((T @ self.old_w[role]).T, n_o),
            _unit_rows(self.new_w[role].T, n_n),
            _unit_rows(delta.right.T, n_o),
        )
        return LowRank(T @ delta.left, right_t.reshape(self.new_w[role].shape[1], -1).T)

    def run(self, deltas: dict[str, LowRank | torch.Tensor]) -> dict[str, LowRank | torch.Tensor]:
        out = {}
        for role, delta in deltas.items():
            if role not in self.new_w:
                continue
            factors = LowRank.of_dense(delta) if isinstance(delta, torch.Tensor) else delta
            carried = self.input_facing(role, factors) if role in INPUT_ROLES else self.output_facing(role, factors)
            out[role] = carried.dense() if isinstance(delta, torch.Tensor) else carried
        return out
