"""The factor-space transfer (ΔW = L R carried factor by factor, QR + core SVD) equals the dense one.

A small dense reference lives here: every old delta s·B·A formed densely, carried with the
formulas of transfer.py (per-unit pseudo-inverses of the h × D unit weights, no Gram trick),
summed over the old layers mapped onto the new one, joined into the new family's modules and
truncated by a full SVD. The migrated s·B·A must match the truncated dense delta and the
reported residual the dense SVD's discarded singular values.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasuite_core.transfer.layer_weights import canonical_deltas, layer_weights, module_deltas
from lorasuite_core.models.loading import LoraAdapter, load_base_model
from lorasuite_core.models.variants.base import LoraFactors
from lorasuite_core.transfer.adapter import PairAnalysis, _source_factors, layer_pair_maps, match_layer_pair, transfer_new_layer
from lorasuite_core.transfer.refactor import LowRank, refactorise
from lorasuite_core.transfer.residual import input_offset, residual_transfer
from lorasuite_core.transfer.unit_maps import INPUT_ROLES
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.transfer.vocab import shared_vocabulary


def _units(role, d):
    if role in ("q", "o"):
        return d.num_heads, d.head_dim
    if role in ("k", "v"):
        return d.num_kv_heads, d.head_dim
    return d.intermediate, 1


def _pairs(role, match):
    if role in ("q", "o"):
        return match.head_pairs
    if role in ("k", "v"):
        return match.kv_pairs
    return [tuple(p) for p in match.neuron_pairs.tolist()]


def dense_carry(old_w, new_w, do, dn, maps, match, mode, P, role, delta):
    """ΔW_new[b] = M ΔW[a] T_in (input-facing) or ΔW_new[:, b] = T_out ΔW[:, a] N, densely."""
    facing_in = role in INPUT_ROLES
    if facing_in:
        T = P if mode == "paper" else maps["attention_input" if role in "qkv" else "mlp_input"]
        X_o, X_n, D_o = old_w[role] @ T, new_w[role], delta @ T
    else:
        T = P.T if mode == "paper" else maps["attention_output" if role == "o" else "mlp_output"]
        X_o, X_n, D_o = (T @ old_w[role]).T, new_w[role].T, (T @ delta).T
    (n_o, h_o), (n_n, h_n) = _units(role, do), _units(role, dn)
    X_o, X_n, D_o = X_o.reshape(n_o, h_o, -1), X_n.reshape(n_n, h_n, -1), D_o.reshape(n_o, h_o, -1)
    out = torch.zeros(n_n, h_n, D_o.shape[-1], dtype=torch.float64)
    for a, b in _pairs(role, match):
        M = X_n[b] @ (torch.linalg.pinv(X_o[a]) if mode == "lstsq" else X_o[a].T)
        out[b] = M @ D_o[a]
    out = out.reshape(n_n * h_n, -1)
    return out if facing_in else out.T


def dense_reference(old, new, analysis, adapter, j, sources, mode):
    summed, offsets = {}, {}
    for i in sources:
        deltas = canonical_deltas(old.family, old.dims, {n: f.delta() for (l, n), f in adapter.factors.items() if l == i})
        maps = layer_pair_maps(old, new, analysis.residual, i, j)
        old_w, new_w = layer_weights(old, i), layer_weights(new, j)
        for role, delta in deltas.items():
            if role in new_w:
                carried = dense_carry(old_w, new_w, old.dims, new.dims, maps, analysis.matches[i], mode,
                                      analysis.residual.P, role, delta)
                summed[role] = summed[role] + carried if role in summed else carried
        for norm_role, roles in (("attention_input", "qkv"), ("mlp_input", ("gate", "up"))):
            c = input_offset(maps[norm_role], old.norm_bias(i, norm_role), new.norm_bias(j, norm_role))
            for role in roles:
                if c is not None and role in deltas and deltas[role].norm() > 0:
                    offsets[f"{i}->{j}.{role}"] = float((deltas[role] @ c).norm() / deltas[role].norm())
    return module_deltas(new.family, new.dims, summed), offsets


def truncated_svd(delta, rank, scaling):
    U, S, Vh = torch.linalg.svd(delta / scaling, full_matrices=False)
    r = min(rank, S.numel())
    residual = float(S[r:].norm() / S.norm()) if S.norm() > 0 else 0.0
    return scaling * (U[:, :r] * S[:r]) @ Vh[:r], residual


def random_adapter(model, layers, rank=3, alpha=5.0, rank_pattern=None, zero=(), seed=0):
    """Every module of every layer, both factors random; ``rank_pattern`` {name: (rank, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in layers:
        for name, spec in model.family.modules.items():
            W = model.layer_weight(layer, spec.path)
            r, a = (rank_pattern or {}).get(name, (rank, alpha))
            B = torch.randn(W.shape[0], r, generator=g, dtype=torch.float64)
            A = torch.randn(r, W.shape[1], generator=g, dtype=torch.float64)
            if (layer, name) in zero:
                B = torch.zeros_like(B)
            factors[(layer, name)] = LoraFactors(A, B, a / r, a)
    return LoraAdapter("memory", model.local_dir, {}, factors)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("factor-transfer")
    built = {}

    def get(old_family, new_family, spec):
        key = (old_family, new_family, spec)
        if key not in built:
            base = root / f"{len(built)}"
            old_dir = make_tiny_model_dir(old_family, base / "old", seed=3)
            new_dir = (upgrade_model_dir(old_dir, base / "new", spec) if new_family == old_family
                       else make_tiny_model_dir(new_family, base / "new", seed=4))
            old, new = load_base_model(old_dir), load_base_model(new_dir)
            shared = shared_vocabulary(old.tokenizer(), new.tokenizer())
            rt = residual_transfer(old, new, shared)
            built[key] = (old, new, PairAnalysis(shared, rt, np.zeros((0, 0)), np.zeros((0, 0)), []))
        return built[key]

    return get


UPGRADE = UpgradeSpec(widen_residual=8, rotate_residual=True, permute_heads=True, permute_neurons=True,
                      extra_neurons=24, kv_replication=2, seed=5)
CASES = {
    # two old layers summed onto one new layer (rank 2·r core truncated to r), modules of other ranks
    "llama-summed-rank-pattern": ("llama", "llama", UPGRADE, [0, 1], "lstsq",
                                  {"q_proj": (5, 7.0), "down_proj": (2, 3.0)}, {(1, "k_proj")}),
    "qwen2-paper": ("qwen2", "qwen2", UPGRADE, [0, 2], "paper", None, ()),
    # fused query_key_value split and joined, LayerNorm offsets
    "gpt_neox-fused-summed": ("gpt_neox", "gpt_neox", UpgradeSpec(rotate_residual=True, permute_heads=True,
                              permute_neurons=True, extra_neurons=8, seed=6), [0, 1], "lstsq", None, ()),
    # split q/k/v joined into query_key_value; gate has no place in gpt_neox and is dropped
    "llama-to-gpt_neox": ("llama", "gpt_neox", None, [1, 2], "lstsq", {"v_proj": (6, 6.0)}, ()),
    # query_key_value split into q/k/v; llama's gate receives nothing
    "gpt_neox-to-llama": ("gpt_neox", "llama", None, [0], "paper", None, {(0, "dense")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_factor_transfer_equals_dense_transfer(case, models):
    old_family, new_family, spec, sources, mode, rank_pattern, zero = CASES[case]
    old, new, analysis = models(old_family, new_family, spec)
    j = 0
    for i in sources:
        analysis.matches[i] = match_layer_pair(old, new, analysis.residual, i, j)
    adapter = random_adapter(old, sources, rank_pattern=rank_pattern, zero=zero)
    result = transfer_new_layer(old, new, analysis, adapter, j, sources, mode)
    expected, offsets = dense_reference(old, new, analysis, adapter, j, sources, mode)
    got = {m.name: m for m in result.modules}
    assert set(got) == set(expected)
    for name, delta in expected.items():
        source = _source_factors(old, new, adapter, name, sources)
        m = got[name]
        assert m.rank == source.rank and m.factors.A.shape == (source.rank, delta.shape[1])
        assert m.factors.B.shape == (delta.shape[0], source.rank)
        truncated, residual = truncated_svd(delta, source.rank, source.scaling)
        product = source.scaling * m.factors.B.double() @ m.factors.A.double()
        scale = max(float(truncated.norm()), 1e-30)
        assert float((product - truncated).norm()) / scale < 1e-5, name      # float32 factors
        assert m.factors.residual == pytest.approx(residual, rel=1e-6, abs=1e-9), name
    assert result.input_offsets.keys() == offsets.keys()
    for key, value in offsets.items():
        assert result.input_offsets[key] == pytest.approx(value, rel=1e-9, abs=1e-12)
    if len(sources) > 1:
        assert max(m.factors.residual for m in result.modules) > 1e-3, "the summed case must truncate"


def test_zero_delta_gives_zero_factors_and_no_residual():
    out = refactorise(LowRank(torch.zeros(7, 3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)), 4, 0.5)
    assert out.residual == 0.0 and out.A.shape == (4, 5) and out.B.shape == (7, 4)
    assert not out.A.any() and not out.B.any()


def test_factor_refactorise_matches_dense_svd_with_truncation():
    g = torch.Generator().manual_seed(3)
    left = torch.randn(40, 6, generator=g, dtype=torch.float64)
    right = torch.randn(6, 30, generator=g, dtype=torch.float64)
    delta = LowRank(left, right)
    for rank in (2, 6, 8):
        factored, dense = refactorise(delta, rank, 0.7), refactorise(delta.dense(), rank, 0.7)
        assert factored.residual == pytest.approx(dense.residual, rel=1e-9, abs=1e-12)
        assert torch.allclose(factored.B.double() @ factored.A.double(), dense.B.double() @ dense.A.double(), atol=1e-5)
    assert LowRank(left, right).norm() == pytest.approx(float(delta.dense().norm()), rel=1e-12)
