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

Two halves. The maps depend on the two base models, the residual maps, the unit matching and
the mode, never on the adapter:

* **compute the maps** (:func:`role_maps`): per role the matched pairs (a, b) and the K unit maps
  (K × h_n × h_o, float64), with ``fit``.  With units as rows (an output-facing role's columns
  transposed, so N is kept as Nᵀ), X_o = W̃ (n_o × h_o × D) and X_n = W_new (n_n × h_n × D):

      lstsq:  M_k = X_n[b_k] X_o[a_k]ᵀ (X_o[a_k] X_o[a_k]ᵀ)⁺     (= X_n[b_k] X_o[a_k]⁺; an h × h
                                                                 pseudo-inverse, not an h × D SVD)
      paper:  M_k = X_n[b_k] X_o[a_k]ᵀ

  The costly part is forming W̃ = W_old T_in (F × d × D multiply-adds for gate/up, likewise
  T_out W_old for o/down), not the h × h pseudo-inverses: 1.66·10¹² FLOP per layer pair at the
  Llama-2-7B → Llama-3-8B shape. That one product runs in CARRY_DTYPE (float32, about twice the
  float64 rate) and its result is widened to float64, where the Grams, pseudo-inverses, maps and
  fits are computed. The checkpoints hold float32 or bfloat16 weights, so a float32 product of
  them loses nothing a function-preserving upgrade can carry: W̃'s entries get a relative
  rounding of ≈ 2⁻²⁴·√d, the recovered maps likewise, far inside the exactness suite's 1e-4.
* **apply the maps to factors** (:class:`CarriedLayer`): L_new[b] = M L[a] and R_new = R T_in,
  or L_new = T_out L and R_new[:, b] = R[:, a] N — k columns per unit.  The residual maps T are
  recomputed from P and the norm gains (an elementwise scaling, :func:`adapter.layer_pair_maps`)
  rather than stored: four d × D float64 matrices per layer pair would be 44 MB on Qwen2.5
  0.5B → 1.5B.  DoRA's effective change E goes through the same maps (dora.carry_dense).

:class:`LayerTransfer` is both in one (the direct path); the pipeline computes the maps once
per model pair in its ``unit_maps`` stage and each adapter only applies them
(:mod:`lorasuite_core.pipeline.unit_map_store`).  Both paths run the same operations on the
same float64 inputs, so their adapters are equal bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasuite_core.models.loading import Dims
from lorasuite_core.transfer.matching import LayerMatch
from lorasuite_core.transfer.refactor import LowRank

INPUT_ROLES = ("q", "k", "v", "gate", "up")
OUTPUT_ROLES = ("o", "down")
MODES = ("lstsq", "paper")
CARRY_DTYPE = torch.float32     # the W_old · T products (module docstring); everything after them in float64


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.norm())
    return float(err.norm()) / scale if scale > 0 else 0.0


def _unit_rows(W: torch.Tensor, n: int) -> torch.Tensor:
    return W.reshape(n, -1, W.shape[-1])


@dataclass
class RoleMap:
    """The unit maps of one role of one layer pair: old units ``a`` -> new units ``b`` through ``M``."""

    a: torch.Tensor          # (K,) int64, old units
    b: torch.Tensor          # (K,) int64, new units
    M: torch.Tensor          # K × h_n × h_o, float64
    n_old: int               # units of the old model (the old factor's split)
    n_new: int               # units of the new model (unmatched ones get zeros)
    fit: float               # ‖W_new − M W̃‖ / ‖W_new‖ over the matched units


def _in_map(role: str, maps, mode: str, P: torch.Tensor) -> torch.Tensor:
    if mode == "paper":
        return P
    return maps["attention_input" if role in ("q", "k", "v") else "mlp_input"]


def _out_map(role: str, maps, mode: str, P: torch.Tensor) -> torch.Tensor:
    if mode == "paper":
        return P.T
    return maps["attention_output" if role == "o" else "mlp_output"]


def unit_pairs(role: str, match: LayerMatch) -> list[tuple[int, int]]:
    if role in ("q", "o"):
        return match.head_pairs
    if role in ("k", "v"):
        return match.kv_pairs
    return [tuple(p) for p in match.neuron_pairs.tolist()]


def unit_counts(role: str, do: Dims, dn: Dims) -> tuple[int, int]:
    if role in ("q", "o"):
        return do.num_heads, dn.num_heads
    if role in ("k", "v"):
        return do.num_kv_heads, dn.num_kv_heads
    return do.intermediate, dn.intermediate


def _solve(X_o: torch.Tensor, X_n: torch.Tensor, pairs, mode: str, n_o: int, n_n: int) -> RoleMap:
    """Units as rows: X_o (n_o × h_o × D), X_n (n_n × h_n × D) -> the K maps with M_k X_o[a_k] ≈ X_n[b_k] (above)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    a, b = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    old_units = X_o[a]
    M = X_n[b] @ old_units.transpose(1, 2)                # K × h_n × h_o   (paper: stop here)
    if mode == "lstsq":
        # W̃⁺ = W̃ᵀ (W̃ W̃ᵀ)⁺ for each unit: an h × h pseudo-inverse instead of an h × D SVD
        gram = old_units @ old_units.transpose(1, 2)
        M = M @ torch.linalg.pinv(gram, hermitian=True, rtol=1e-12)
    return RoleMap(a, b, M.contiguous(), n_o, n_n, _rel(X_n[b] - M @ old_units, X_n[b]))


def _carry_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right in CARRY_DTYPE, widened back to the inputs' dtype."""
    return (left.to(CARRY_DTYPE) @ right.to(CARRY_DTYPE)).to(left.dtype)


def role_maps(old_w, new_w, do: Dims, dn: Dims, maps, match: LayerMatch, mode: str, P: torch.Tensor,
              roles=None) -> dict[str, RoleMap]:
    """Compute the maps of ``roles`` (default: all) of one layer pair, those both layers have."""
    out = {}
    for role in [r for r in (old_w if roles is None else roles) if r in old_w and r in new_w]:
        n_o, n_n = unit_counts(role, do, dn)
        if role in INPUT_ROLES:
            T = _in_map(role, maps, mode, P)
            X_o, X_n = _unit_rows(_carry_product(old_w[role], T), n_o), _unit_rows(new_w[role], n_n)
        else:
            T = _out_map(role, maps, mode, P)                 # columns handled as rows
            X_o, X_n = _unit_rows(_carry_product(T, old_w[role]).T, n_o), _unit_rows(new_w[role].T, n_n)
        out[role] = _solve(X_o, X_n, unit_pairs(role, match), mode, n_o, n_n)
    return out


class CarriedLayer:
    """Applies the maps of one (old layer, new layer) pair to factors; ``fit`` of the roles carried."""

    def __init__(self, maps_by_role: dict[str, RoleMap], maps, mode: str, P: torch.Tensor):
        self.role_maps, self.maps, self.mode, self.P = maps_by_role, maps, mode, P
        self.fit: dict[str, float] = {}

    @property
    def roles(self) -> set[str]:
        return set(self.role_maps)

    def _carry(self, role: str, F_o: torch.Tensor) -> torch.Tensor:
        """Factor F (n_o·h_o × k, units as rows) -> n_n·h_n × k: out[b] = M F[a], zero for unmatched units."""
        m = self.role_maps[role]
        if F_o.shape[0] % m.n_old:
            raise ValueError(f"{role}: a factor of {F_o.shape[0]} rows does not split into {m.n_old} units")
        F_o = _unit_rows(F_o, m.n_old)
        if m.M.shape[0] and m.M.shape[2] != F_o.shape[1]:
            raise ValueError(f"{role}: unit maps of width {m.M.shape[2]} for units of {F_o.shape[1]} rows")
        self.fit[role] = m.fit
        out = torch.zeros(m.n_new, m.M.shape[1], F_o.shape[-1], dtype=F_o.dtype)
        out[m.b] = m.M @ F_o[m.a]
        return out.reshape(m.n_new * m.M.shape[1], -1)

    def input_facing(self, role: str, delta: LowRank) -> LowRank:
        return LowRank(self._carry(role, delta.left), delta.right @ _in_map(role, self.maps, self.mode, self.P))

    def output_facing(self, role: str, delta: LowRank) -> LowRank:
        T = _out_map(role, self.maps, self.mode, self.P)
        return LowRank(T @ delta.left, self._carry(role, delta.right.T).T)

    def run(self, deltas: dict[str, LowRank | torch.Tensor]) -> dict[str, LowRank | torch.Tensor]:
        out = {}
        for role, delta in deltas.items():
            if role not in self.role_maps:
                continue
            factors = LowRank.of_dense(delta) if isinstance(delta, torch.Tensor) else delta
            carried = self.input_facing(role, factors) if role in INPUT_ROLES else self.output_facing(role, factors)
            out[role] = carried.dense() if isinstance(delta, torch.Tensor) else carried
        return out


class LayerTransfer(CarriedLayer):
    """The direct path: the maps of one (old layer, new layer) pair computed here, then applied."""

    def __init__(self, old_w, new_w, do: Dims, dn: Dims, maps, match: LayerMatch, mode: str, P: torch.Tensor,
                 roles=None):
        super().__init__(role_maps(old_w, new_w, do, dn, maps, match, mode, P, roles), maps, mode, P)
