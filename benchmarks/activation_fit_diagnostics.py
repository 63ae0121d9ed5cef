"""What limits the activation-fitted transfer on a real pair (issue 22, item 2): held-out fit diagnostics.

From a migration's cache (the ``activations``, ``transfer_matrix`` and ``layer_mapping`` entries of
``--cache-root``) and the source adapter, per mapped layer pair (i -> j), with the paired positions
split in two halves (first half: fit, second half: held out):

* ``r2_attention_input`` / ``r2_mlp_input`` / ``r2_residual_new_from_old``: held-out R² of the ridge
  fits u_old ≈ T_in u_new and z_new ≈ Q̂ z_old (lorasuite_core/transfer/activation_fit.py), for
  several ridge factors ρ (``weights``: the weight-based T_in on the same rows);
* ``captured_*``: the share of the adapter's input features ‖R u_old‖² (q, k, v, gate, up; u the
  normed module input) that the carried right factor R T_in reproduces from the new model's
  inputs on held-out positions, for the weight-fitted T_in (residual.py) and the activation-fitted
  one -- the input-side ceiling of the transfer: what no unit map can add back;
* ``r2_output_directions_*``: for o/down, held-out R² of the old stream's coordinates along the
  adapter's output directions (an orthonormal basis of L's columns) predicted from the new stream:
  whether what the adapter writes is something the new stream represents at all.

Usage (after benchmarks/activation_fit_qwen.sh, one thread, niced)::

    PYTHONPATH=$PWD nice -n 19 python benchmarks/activation_fit_diagnostics.py --old-model OLD --new-model NEW \\
        --adapter ADAPTER --cache-root CACHE --output benchmarks/results/activation_fit_qwen_diagnostics.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch

from lorasuite_core.models.loading import load_base_model, load_lora_adapter
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.pipeline.pair_stages import _load_transfer
from lorasuite_core.pipeline.plans import plan_pair
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.transfer import activation_fit as AF
from lorasuite_core.transfer.residual import input_map as weight_input_map

INPUT_ROLES = {"q": "attention_input", "k": "attention_input", "v": "attention_input",
               "gate": "mlp_input", "up": "mlp_input"}
OUTPUT_ROLES = ("o", "down")
RHOS = (1e-6, 1e-3, 1e-2, 1e-1)


def _entry(store, plan, stage):
    return store.local_dir(store.location(stage, plan.stage_keys[stage]))


def _right_factors(adapter, family, layer):
    """{canonical role: (R = A, L = s B)} of one old layer (no fused modules in the measured families)."""
    out = {}
    for (l, name), f in adapter.factors.items():
        if l == layer:
            out[family.modules[name].role] = (f.A.double(), f.scaling * f.B.double())
    return out


def _solve(gram: torch.Tensor, cross: torch.Tensor, rho: float) -> torch.Tensor:
    """activation_fit.ridge from a precomputed Gram AᵀA and cross product AᵀB (one Gram, several ρ)."""
    lam = rho * float(torch.diagonal(gram).sum()) / gram.shape[0]
    return torch.cholesky_solve(cross, torch.linalg.cholesky(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)))


def layer_diagnostics(old, new, rt, adapter, o_states, n_states, i, j, half):
    """Fits on the first half of the positions (states entering and leaving the layer), scored on the rest;
    the Grams once per pair, the ridge solves per ρ; no row trimming (it keeps every row on this pair)."""
    X_o, X_n = AF.layer_rows(o_states, i), AF.layer_rows(n_states, j)
    rows = X_o.shape[0] // 2
    train = torch.cat([torch.arange(0, half), torch.arange(rows, rows + half)])
    test = torch.cat([torch.arange(half, rows), torch.arange(rows + half, 2 * rows)])
    Z_o, _ = AF.normalised_rows(X_o, old.family.norm_kind)
    Z_n, _ = AF.normalised_rows(X_n, new.family.norm_kind)
    norms_o, norms_n = AF.norms_of(old, i), AF.norms_of(new, j)
    U_o = {role: AF.module_inputs(Z_o, *norms_o[role]) for role in AF.INPUT_NORMS}
    U_n = {role: AF.module_inputs(Z_n, *norms_n[role]) for role in AF.INPUT_NORMS}
    factors = _right_factors(adapter, old.family, i)
    bases = {role: torch.linalg.qr(factors[role][1])[0] for role in OUTPUT_ROLES if role in factors}   # d × k
    grams = {role: (U_n[role][train].T @ U_n[role][train], U_n[role][train].T @ U_o[role][train])
             for role in AF.INPUT_NORMS}
    G_o, C_o = Z_o[train].T @ Z_o[train], Z_o[train].T @ Z_n[train]
    G_n = Z_n[train].T @ Z_n[train]
    out = {"old_layer": i, "new_layer": j, "by_ridge": {}}
    for rho in RHOS:
        T = {role: _solve(*grams[role], rho).T for role in AF.INPUT_NORMS}       # d × D each
        entry = {f"r2_{role}": AF.r_squared(U_n[role][test], T[role].T, U_o[role][test]) for role in AF.INPUT_NORMS}
        entry["r2_residual_new_from_old"] = AF.r_squared(Z_o[test], _solve(G_o, C_o, rho), Z_n[test])
        for role, norm_role in INPUT_ROLES.items():
            if role in factors:
                R = factors[role][0]
                entry[f"captured_{role}"] = AF.captured_share(U_o[norm_role][test], U_n[norm_role][test], R,
                                                              R @ T[norm_role])
        for role, basis in bases.items():   # can the new stream tell the old one's coordinates along L's columns?
            F = Z_o @ basis
            W = _solve(G_n, Z_n[train].T @ F[train], rho)
            entry[f"r2_output_directions_{role}"] = AF.r_squared(Z_n[test], W, F[test])
        out["by_ridge"][f"{rho:g}"] = entry
    weights = {}
    for role, norm_role in INPUT_ROLES.items():
        if role in factors:
            T_w = weight_input_map(rt, norms_o[norm_role][0], norms_n[norm_role][0])
            R = factors[role][0]
            weights[f"captured_{role}"] = AF.captured_share(U_o[norm_role][test], U_n[norm_role][test], R, R @ T_w)
    for role in AF.INPUT_NORMS:
        T_w = weight_input_map(rt, norms_o[role][0], norms_n[role][0])
        weights[f"r2_{role}"] = AF.r_squared(U_n[role][test], T_w.T, U_o[role][test])
    out["weights"] = weights
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-model", required=True)
    ap.add_argument("--new-model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--cache-root", required=True)
    ap.add_argument("--calibration-data", default=None)
    ap.add_argument("--max-calibration-tokens", type=int, default=2048)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    plan = plan_pair(args.old_model, args.new_model, AnalysisOptions(calibration_data=args.calibration_data,
                                                                        max_calibration_tokens=args.max_calibration_tokens))
    store = StageStore.at(args.cache_root)
    old, new = load_base_model(args.old_model), load_base_model(args.new_model)
    adapter = load_lora_adapter(args.adapter, old.family)
    states = __import__("safetensors.numpy", fromlist=["load_file"]).load_file(
        _entry(store, plan, "activations") / "activations.safetensors")
    rt = _load_transfer(store, store.location("transfer_matrix", plan.stage_keys["transfer_matrix"]))
    mapping = store.facts(store.location("layer_mapping", plan.stage_keys["layer_mapping"]))["layer_mapping"]
    half = states["old_states"].shape[1] // 2
    layers = [layer_diagnostics(old, new, rt, adapter, states["old_states"], states["new_states"], int(i), int(j), half)
              for i, j in mapping]
    summary = {}
    for key in ("weights",) + tuple(f"{r:g}" for r in RHOS):
        entries = [l["weights"] if key == "weights" else l["by_ridge"][key] for l in layers]
        summary[key] = {name: float(np.mean([e[name] for e in entries if name in e]))
                        for name in sorted({n for e in entries for n in e})}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result = {"command": "benchmarks/activation_fit_diagnostics.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
              "cpu": next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")),
                          platform.processor()),
              "conditions": "1 thread, nice 19, beside other jobs on 2 cores",
              "paired_positions": int(states["old_states"].shape[1]), "fit_positions": half,
              "seconds": round(time.time() - start, 1), "mean_over_layers": summary, "layers": layers}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
