"""Residual-side maps fitted on paired calibration activations (``transfer_fit: activations``).

The weight-based maps (:mod:`.residual`) come from one least squares on the shared token
embeddings and serve every layer. Between independently trained models that fit is poor, and
what a LoRA module sees is not an embedding but the normed residual stream at its layer. Here
each mapped layer pair (old i -> new j) gets its own maps, fitted on the paired hidden states
of the ``activations`` stage (:mod:`.activations`: both models read the same text; positions
where both tokenisations end a token at the same character are paired).

Rows. For the pair (i, j) the rows are the states entering and leaving the layer, paired
position by position and stacked: X_o = [h_o^i; h_o^(i+1)] (2N × d), X_n = [h_n^j; h_n^(j+1)]
(2N × D), float64. Attention reads norm(h^i); the MLP reads norm(h^i + attention output),
which the stage does not store: the stacked states bracket it, and the same maps serve both
sub-blocks (an approximation on real pairs; exact under a function-preserving upgrade, where
every state is carried by the same linear map).

Normalisation. A projection after a norm sees u = g ⊙ z + b, z = x / rms(x) (RMSNorm) or
z = (x − x̄) / std(x) (LayerNorm; ε left out: it matters only for rows near zero). Each row is
normalised the family's way first, so the fits are scale-free per position (a few positions of
huge norm, attention sinks, do not dominate them) and the width change d -> D needs no √(d/D)
factor. The input side is fitted on the module inputs themselves, per norm role (attention_input,
mlp_input), U = Z diag(g) + 1 bᵀ with that layer's gain and bias:

    T_in (d × D) = argmin ‖U_n T_inᵀ − U_o‖² + λ ‖T_in‖²            u_old ≈ T_in u_new

so a LayerNorm bias is carried wherever the new inputs determine it (it lies in their span), and
the output side on the normalised residual rows:

    Q̂ (D × d) = argmin ‖Z_o Q̂ᵀ − Z_n‖² + λ ‖Q̂‖²                    z_new ≈ Q̂ z_old
    T_out (D × d) = k · Q̂                  (no post-norm)           x_new ≈ T_out x_old
                  = diag(g_n)⁺ · Q̂ · diag(g_o)  (post-norm: its input's scale is immaterial)

with k the median over rows of rms(x_n) / rms(x_o) (LayerNorm: std): the scale that brings the
old residual's size to the new one's, robust to the few huge rows. An input-facing delta becomes
L R T_in (R_new = R T_in), an o/down delta T_out L R, and the unit side is unchanged (unit_maps.py,
against the weights, through these maps).

Rows whose contexts differ. A position is paired where both tokenisations end a token at the
same character, but the two models may have read that prefix in different tokens (a tokenizer
with extra merges); such a row is not the same function of the text on both sides. Trimmed refits
remove them: after a fit of Q̂, rows whose relative residual ‖Q̂ z_o − z_n‖ / ‖z_n‖ exceeds
max(TRIM · median, FLOOR) (10×, 1e-4) are dropped and Q̂ refitted on the rest, until no row goes
(at most 4 fits; the first fit is pulled by the bad rows, the next ones are not); every map is
then fitted on the rows kept. Rows after a differently tokenised span differ too, less and less.
Under a function-preserving upgrade the other rows fit to rounding (~1e-7), so exactly the
differently tokenised ones go; on a real pair the median residual is large (≳ 0.3) and no row
lies ten times above it, so nothing is dropped (``rows_kept`` in the report says how many stayed).

Repeated rows. Texts that share a prefix (the adapter's prompts in one template) give the same
paired states again and again; each distinct row is kept once, so the template neither dominates
the fit nor sets the trimming's median (which would then drop ordinary rows).

Solves: through the Grams (normal equations, Cholesky, float64): T_inᵀ = (U_nᵀU_n + λI)⁻¹ U_nᵀU_o.
The ridge is relative: λ = ρ · tr(AᵀA) / cols(A), i.e. ρ times the mean eigenvalue of the Gram. It
removes the rounding noise in the directions a widened stream never uses (there the Gram is exactly
singular) and shrinks a direction with eigenvalue σ² by σ² / (σ² + λ).

Choosing ρ (each of the three fits of a pair on its own): held-out error over ``FOLDS`` folds of the
rows (a seeded permutation), each fold predicted by the fit on the others, for every ρ of ``RHOS``
(1e-6 … 1). The Grams are formed once: a fold's training Gram is the whole Gram minus the fold's own.
The smallest ρ whose summed error is within ``TIE`` (1 %) of the best, or below ``EXACT`` (1e-10) of
the targets' variance, wins. On a real pair with fewer distinct rows than unknowns per output the
smallest ρ overfits (held-out captured share −6 against +0.5 at ρ = 0.1 on the Qwen pair:
benchmarks/README.md); under a function-preserving upgrade every ρ small enough to be exact predicts
the held-out rows to rounding, and the smallest of them is taken, ``RIDGE`` (1e-6), as before --
provided each fold's training rows span the old stream (with 2 folds, twice the d distinct rows the fit
itself needs; fewer, and no ρ predicts held-out rows, so a larger one may be chosen). The
trimming below always fits at ``RIDGE``. Cost per pair: the three Grams of 2N rows
(2N · (2D² + d²) multiply-adds), once more for the folds, and |RHOS| · FOLDS + 1 Cholesky solves per
fit; nothing of size N × N or vocab × hidden.

Exactness. Under a function-preserving upgrade every new state is x_n = c · M x_o with M
orthogonal on the old stream's span (rotation, permutation, sign, zero-widening, replication
scaled to keep norms; for LayerNorm maps that keep the all-ones direction), so z_n = √(D/d) M z_o,
k = c √(d/D), k Q̂ = c M, and u_o = T u_n exactly for the weight-based T_in: with λ -> 0 the fits
reproduce the weight-based maps on every input the new model produces (what lies outside that
span multiplies only zero), and the transfer is as exact as with ``transfer_fit: weights``
(tests/test_exactness.py runs both settings; tests/test_activation_fit.py the closed forms).

Diagnostics (:class:`ActivationFit`): each fit's R² = 1 − ‖fit − target‖² / ‖target − mean‖² on
the rows fitted, and for an adapter the share of its input features captured, :func:`captured_share`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.transfer.residual import _inverse_gain

RIDGE = 1e-6
#: The ridge candidates, folds and near-tie rule of the held-out choice of ρ (module docstring).
RHOS = (RIDGE, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FOLDS, TIE, EXACT = 2, 0.01, 1e-10
TRIM, FLOOR, TRIM_ROUNDS = 10.0, 1e-4, 4


def normalised_rows(X: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows z = x / rms(x) (RMSNorm) or (x − x̄) / std(x) (LayerNorm), float64, and the row scales."""
    X = X.double()
    if kind == "layer":
        X = X - X.mean(dim=1, keepdim=True)
    elif kind != "rms":
        raise LorasuiteError(f"unknown norm kind {kind!r}")
    scale = X.pow(2).mean(dim=1).sqrt()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return X / safe[:, None], scale


def ridge(A: torch.Tensor, B: torch.Tensor, rho: float = RIDGE) -> torch.Tensor:
    """X = argmin ‖A X − B‖² + λ‖X‖², λ = ρ · tr(AᵀA) / cols(A), in float64 (cols(A) × cols(B))."""
    if A.shape[0] != B.shape[0]:
        raise LorasuiteError(f"ridge: {A.shape[0]} rows of inputs but {B.shape[0]} rows of targets")
    A, B = A.double(), B.double()
    return _solve(A.T @ A, A.T @ B, rho)


def _solve(gram: torch.Tensor, cross: torch.Tensor, rho: float) -> torch.Tensor:
    """(G + λI)⁻¹ C with λ = ρ · tr(G) / cols(G) (``gram`` is not modified)."""
    gram = gram.clone()
    lam = rho * float(torch.diagonal(gram).sum()) / max(gram.shape[0], 1)
    gram.diagonal().add_(lam if lam > 0 else 0.0)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(cross, chol)
    return torch.linalg.lstsq(gram, cross, driver="gelsd").solution   # λ = 0 on a singular Gram


def held_out_errors(A: torch.Tensor, B: torch.Tensor, rhos=RHOS, folds: int = FOLDS) -> torch.Tensor:
    """Per ρ: Σ over folds of ‖A_f X_(−f) − B_f‖², X_(−f) the ridge fit on the other folds' rows."""
    A, B = A.double(), B.double()
    gram, cross = A.T @ A, A.T @ B
    order = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(0))
    errors = torch.zeros(len(rhos), dtype=torch.float64)
    for part in order.chunk(folds):
        A_f, B_f = A[part], B[part]
        G, C = gram - A_f.T @ A_f, cross - A_f.T @ B_f
        for k, rho in enumerate(rhos):
            errors[k] += float((A_f @ _solve(G, C, rho) - B_f).pow(2).sum())
    return errors


def choose_ridge(A: torch.Tensor, B: torch.Tensor, rhos=RHOS, folds: int = FOLDS) -> float:
    """The smallest ρ of ``rhos`` whose held-out error is within ``TIE`` of the best or below ``EXACT`` of B's
    variance (module docstring); ``rhos[0]`` when there are too few rows to hold any out."""
    if A.shape[0] < 2 * folds:
        return rhos[0]
    errors = held_out_errors(A, B, rhos, folds)
    total = float((B.double() - B.double().mean(dim=0, keepdim=True)).pow(2).sum())
    bound = max(float(errors.min()) * (1 + TIE), EXACT * total)
    return next(rho for rho, error in zip(rhos, errors.tolist()) if error <= bound)


def r_squared(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> float:
    """1 − ‖A X − B‖² / ‖B − mean(B)‖²: the share of B's variance the fit explains."""
    total = float((B - B.mean(dim=0, keepdim=True)).pow(2).sum())
    return 1.0 - float((A @ X - B).pow(2).sum()) / total if total > 0 else 1.0


INPUT_NORMS = ("attention_input", "mlp_input")
OUTPUT_NORMS = ("attention_output", "mlp_output")


@dataclass
class ActivationFit:
    inputs: dict[str, torch.Tensor]   # norm role -> T_in (d × D): u_old ≈ T_in u_new
    Q: torch.Tensor                   # D × d: z_new ≈ Q z_old (normalised residual rows)
    scale: float                      # k: median rms(x_new) / rms(x_old)
    r2: dict[str, float]              # per input norm role and "residual_new_from_old", on the rows fitted
    kept: float = 1.0                 # share of the distinct paired rows fitted (outlier_rows)
    rho: dict[str, float] = field(default_factory=dict)   # the ridge of each fit (same keys as r2)

    def report(self) -> dict[str, float]:
        return {**{f"r2_{k}": round(v, 6) for k, v in self.r2.items()}, "scale": round(self.scale, 6),
                "rows_kept": round(self.kept, 6), **{f"rho_{k}": v for k, v in self.rho.items()}}


def layer_rows(states: np.ndarray, layer: int) -> torch.Tensor:
    """The paired states entering and leaving ``layer``, stacked: 2N × width (see the module docstring)."""
    return torch.from_numpy(np.concatenate([states[layer], states[layer + 1]]))


def module_inputs(Z: torch.Tensor, gain: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """U = Z diag(g) + 1 bᵀ: what a projection after the norm receives."""
    U = Z if gain is None else Z * gain[None, :]
    return U if bias is None else U + bias[None, :]


def outlier_rows(Z_o: torch.Tensor, Z_n: torch.Tensor, rho: float = RIDGE) -> torch.Tensor:
    """Rows to keep: relative residual of z_n ≈ Q̂ z_o at most max(TRIM · median, FLOOR), refitted on the
    rows kept until none more goes (at most TRIM_ROUNDS fits; module docstring)."""
    keep = torch.ones(Z_o.shape[0], dtype=torch.bool)
    for _ in range(TRIM_ROUNDS):
        Q_t = ridge(Z_o[keep], Z_n[keep], rho)
        r = (Z_o @ Q_t - Z_n).norm(dim=1) / Z_n.norm(dim=1).clamp_min(1e-300)
        now = keep & (r <= max(TRIM * float(r[keep].median()), FLOOR))
        if bool((now == keep).all()):
            break
        keep = now
    return keep


def distinct_rows(X_old: torch.Tensor, X_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each paired row once: texts that share a prefix (a prompt template) repeat the same states, which would
    weigh the fit and set the trimming's median (sorted order: least squares does not depend on it)."""
    both = torch.unique(torch.cat([X_old.double(), X_new.double()], dim=1), dim=0)
    return both[:, :X_old.shape[1]], both[:, X_old.shape[1]:]


def fit_pair(X_old: torch.Tensor, X_new: torch.Tensor, norms_old: dict, norms_new: dict, kind_old: str,
             kind_new: str, rho: float | None = None) -> ActivationFit:
    """T_in per input norm role, Q̂ and k from paired rows X_old (n × d), X_new (n × D); ``norms_*``:
    norm role -> (gain, bias), either None.  ``rho``: one ridge for every fit (None: each fit's own, chosen on
    held-out rows, :func:`choose_ridge`)."""
    if X_old.shape[0] != X_new.shape[0]:
        raise LorasuiteError(f"activation fit: {X_old.shape[0]} old rows but {X_new.shape[0]} new rows")
    X_old, X_new = distinct_rows(X_old, X_new)
    Z_o, s_o = normalised_rows(X_old, kind_old)
    Z_n, s_n = normalised_rows(X_new, kind_new)
    keep = outlier_rows(Z_o, Z_n, RIDGE if rho is None else rho)
    Z_o, Z_n, s_o, s_n = Z_o[keep], Z_n[keep], s_o[keep], s_n[keep]
    inputs, r2, rhos = {}, {}, {}
    pick = (lambda A, B: choose_ridge(A, B)) if rho is None else (lambda A, B: rho)
    for role in INPUT_NORMS:
        U_o, U_n = module_inputs(Z_o, *norms_old.get(role, (None, None))), module_inputs(Z_n, *norms_new.get(role, (None, None)))
        rhos[role] = pick(U_n, U_o)
        T_t = ridge(U_n, U_o, rhos[role])
        inputs[role], r2[role] = T_t.T.contiguous(), r_squared(U_n, T_t, U_o)
    rhos["residual_new_from_old"] = pick(Z_o, Z_n)
    Q_t = ridge(Z_o, Z_n, rhos["residual_new_from_old"])
    r2["residual_new_from_old"] = r_squared(Z_o, Q_t, Z_n)
    both = (s_o > 0) & (s_n > 0)
    k = float((s_n[both] / s_o[both]).median()) if bool(both.any()) else 1.0
    return ActivationFit(inputs=inputs, Q=Q_t.T.contiguous(), scale=k, r2=r2, kept=float(keep.double().mean()),
                         rho=rhos)


def norms_of(model, layer: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    return {role: (model.norm_gain(layer, role), model.norm_bias(layer, role)) for role in INPUT_NORMS}


def output_map(fit: ActivationFit, g_old: torch.Tensor | None, g_new: torch.Tensor | None) -> torch.Tensor:
    """T_out (D × d): k Q̂ into the residual stream, or diag(g_n)⁺ Q̂ diag(g_o) into a post-norm."""
    if g_old is None and g_new is None:
        return fit.scale * fit.Q
    T = fit.Q
    if g_old is not None:
        T = T * g_old[None, :]
    if g_new is not None:
        T = _inverse_gain(g_new)[:, None] * T
    return T


def layer_maps(old, new, fit: ActivationFit, i: int, j: int) -> dict[str, torch.Tensor]:
    """The four residual-side maps of old layer i against new layer j (the keys of adapter.layer_pair_maps)."""
    maps = dict(fit.inputs)
    for role in OUTPUT_NORMS:
        maps[role] = output_map(fit, old.norm_gain(i, role), new.norm_gain(j, role))
    return maps


def captured_share(X_old: torch.Tensor, X_new: torch.Tensor, A_old: torch.Tensor, A_new: torch.Tensor) -> float:
    """Share of an adapter's input features that a map reproduces: 1 − ‖X_n A_nᵀ − X_o A_oᵀ‖² / ‖X_o A_oᵀ‖².

    With X the module inputs U (rows) and A_old = R (k × d) a LoRA's right factor, A_new = R T_in
    (k × D) is the carried one: the features are formed k columns at a time, never a dense product."""
    target = X_old @ A_old.T
    total = float(target.pow(2).sum())
    return 1.0 - float((X_new @ A_new.T - target).pow(2).sum()) / total if total > 0 else 1.0


# ----------------------------------------------------------------------------- the pair analysis' part

FITS = "activation_fits.safetensors"


def fit_mapped_pairs(old, new, old_states: np.ndarray, new_states: np.ndarray, mapping: list[tuple[int, int]],
                     rho: float | None = None) -> dict[tuple[int, int], ActivationFit]:
    """One :class:`ActivationFit` per mapped layer pair, from the activations stage's states."""
    if old_states.shape[1] != new_states.shape[1]:
        raise LorasuiteError(f"activation fit: {old_states.shape[1]} old positions but {new_states.shape[1]} new ones")
    return {(i, j): fit_pair(layer_rows(old_states, i), layer_rows(new_states, j), norms_of(old, i), norms_of(new, j),
                             old.family.norm_kind, new.family.norm_kind, rho)
            for i, j in mapping}


def save_fits(fits: dict[tuple[int, int], ActivationFit], path) -> dict[str, dict[str, float]]:
    """The maps per pair in one safetensors file (float32: the states' precision); returns the per-pair facts."""
    from safetensors.torch import save_file

    arrays = {}
    for (i, j), fit in fits.items():
        for role, T in fit.inputs.items():
            arrays[f"{role}.{i}.{j}"] = T.float().contiguous()
        arrays[f"Q.{i}.{j}"] = fit.Q.float().contiguous()
        arrays[f"stats.{i}.{j}"] = torch.tensor([fit.scale, fit.kept] + [fit.r2[k] for k in sorted(fit.r2)],
                                                dtype=torch.float64)
        arrays[f"rho.{i}.{j}"] = torch.tensor([fit.rho[k] for k in sorted(fit.rho)], dtype=torch.float64)
    save_file(arrays, path)
    return {f"{i}->{j}": fit.report() for (i, j), fit in fits.items()}


def load_fits(path) -> dict[tuple[int, int], ActivationFit]:
    from safetensors.torch import load_file

    arrays = load_file(path)
    keys = sorted([*INPUT_NORMS, "residual_new_from_old"])
    fits = {}
    for name in arrays:
        if name.startswith("Q."):
            _, i, j = name.split(".")
            scale, kept, *r2 = arrays[f"stats.{i}.{j}"].tolist()
            rho = dict(zip(keys, arrays[f"rho.{i}.{j}"].tolist())) if f"rho.{i}.{j}" in arrays else {}
            fits[(int(i), int(j))] = ActivationFit({role: arrays[f"{role}.{i}.{j}"].double() for role in INPUT_NORMS},
                                                   arrays[name].double(), scale, dict(zip(keys, r2)), kept, rho)
    return fits
