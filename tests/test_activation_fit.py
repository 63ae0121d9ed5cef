"""The activation-fitted residual maps (lorasuite_core/transfer/activation_fit.py) against closed forms.

The end-to-end check -- a migration with ``--transfer-fit activations`` reproduces the old adapter's logits
under function-preserving upgrades -- is tests/test_exactness.py, parametrised over both fits.
"""
from __future__ import annotations

import torch

from lorasuite_core.pipeline.plans import calibration_texts, plan_pair
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.transfer import activation_fit as AF
from lorasuite_core.transfer.residual import ResidualTransfer, input_map, output_map


def test_ridge_matches_a_hand_computed_case():
    # AᵀA = diag(4, 1): λ = ρ · tr / cols = 0.4 · 5 / 2 = 1, so X = diag(1/5, 1/2) · AᵀB = diag(1/5, 1/2) · [4, 3]
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[2.0], [3.0]])
    X = AF.ridge(A, B, rho=0.4)
    assert torch.allclose(X, torch.tensor([[0.8], [1.5]], dtype=torch.float64), atol=1e-15)


def test_ridge_matches_the_normal_equations_and_plain_least_squares():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    lam = 0.1 * float((A * A).sum()) / 6
    expected = torch.linalg.solve(A.T @ A + lam * torch.eye(6, dtype=torch.float64), A.T @ B)
    assert torch.allclose(AF.ridge(A, B, rho=0.1), expected, atol=1e-12)
    assert torch.allclose(AF.ridge(A, B, rho=0.0), torch.linalg.lstsq(A, B).solution, atol=1e-10)


def test_held_out_errors_match_fits_on_the_other_fold():
    """The fold errors from the whole Gram minus the fold's own equal fitting on the other rows directly."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    expected = []
    for rho in (1e-6, 0.1):
        total = 0.0
        for part in order.chunk(2):
            rest = torch.ones(40, dtype=torch.bool)
            rest[part] = False
            total += float((A[part] @ AF.ridge(A[rest], B[rest], rho) - B[part]).pow(2).sum())
        expected.append(total)
    assert torch.allclose(AF.held_out_errors(A, B, rhos=(1e-6, 0.1)), torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-10)


def test_the_ridge_is_chosen_on_held_out_rows():
    """Noisy targets with almost as many unknowns as rows: the smallest ρ overfits, held-out rows pick a larger one;
    an exact linear relation (a function-preserving upgrade) keeps the smallest, as before the choice existed."""
    g = torch.Generator().manual_seed(4)
    n, p = 60, 40
    A = torch.randn(n, p, generator=g, dtype=torch.float64)
    X = torch.randn(p, 3, generator=g, dtype=torch.float64) * 0.1
    noisy = A @ X + torch.randn(n, 3, generator=g, dtype=torch.float64)
    errors = AF.held_out_errors(A, noisy)
    chosen = AF.choose_ridge(A, noisy)
    assert chosen > AF.RIDGE and float(errors[AF.RHOS.index(chosen)]) < float(errors[0])
    wide = torch.randn(2 * n, p, generator=g, dtype=torch.float64)     # each fold's training rows span A's columns
    assert AF.choose_ridge(wide, wide @ X) == AF.RIDGE
    assert AF.choose_ridge(A[:3], noisy[:3]) == AF.RIDGE                     # too few rows to hold any out
    X_o, X_n, _ = _widened()
    fit = AF.fit_pair(X_o, X_n, {}, {}, "rms", "rms")                       # exact: every fit at the smallest ρ
    assert fit.rho == {"attention_input": AF.RIDGE, "mlp_input": AF.RIDGE, "residual_new_from_old": AF.RIDGE}
    assert fit.report()["rho_residual_new_from_old"] == AF.RIDGE


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _widened(n=400, d=6, D=9, c=2.5, seed=0):
    """Rows x_n = c · x_o M: the old stream rotated into a wider one (M Mᵀ = I), scaled by c."""
    g = torch.Generator().manual_seed(seed)
    X_o = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    X_o[:3] *= 300.0                                             # a few huge rows (attention sinks)
    M = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0][:d]
    return X_o, c * X_o @ M, M


def test_fit_recovers_a_widened_rotated_scaled_stream_and_the_weight_based_maps():
    d, D, c = 6, 9, 2.5
    X_o, X_n, M = _widened(d=d, D=D, c=c)
    # a rotated stream carries the old gains only folded into the next linears: new gains 1 (the upgrade's fold_norms)
    g_o = 1 + torch.rand(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_n = torch.ones(D, dtype=torch.float64)
    fit = AF.fit_pair(X_o, X_n, {"attention_input": (g_o, None)}, {"attention_input": (g_n, None)}, "rms", "rms")
    assert abs(fit.scale - c * (d / D) ** 0.5) < 1e-12                 # rms of the new rows over the old
    assert torch.allclose(fit.Q, (D / d) ** 0.5 * M.T, atol=1e-6)       # z_n = √(D/d) Mᵀ z_o
    assert all(v > 1 - 1e-9 for v in fit.r2.values())
    # the weight-based maps of the same relation (residual.py: P = M / c, Q = c Mᵀ, s = 1 / c)
    rt = ResidualTransfer(P=M / c, Q=c * M.T, scale=1 / c, fit_residual_old=0.0, fit_residual_new=0.0)
    # on the inputs the new model produces (u_n = g_n ⊙ z_n) both maps agree; off that span they need not
    U_n = AF.module_inputs(AF.normalised_rows(X_n, "rms")[0], g_n, None)
    T_w = input_map(rt, g_o, g_n)
    assert _rel(U_n @ fit.inputs["attention_input"].T, U_n @ T_w.T) < 1e-5         # ridge ρ = 1e-6
    assert torch.allclose(fit.inputs["mlp_input"], (d / D) ** 0.5 * M, atol=1e-6)   # no norm given: u = z
    assert torch.allclose(AF.output_map(fit, None, None), output_map(rt, None, None), atol=1e-6)
    post, ref = AF.output_map(fit, g_o, g_n), output_map(rt, g_o, g_n)  # into a post-norm: up to a scale
    assert torch.allclose(post / post.norm(), ref / ref.norm(), atol=1e-6)


def test_layernorm_inputs_are_centred_and_the_bias_is_carried():
    d = 5
    g = torch.Generator().manual_seed(2)
    X_o = torch.randn(200, d, generator=g, dtype=torch.float64) + 3.0          # a common offset LayerNorm removes
    perm = torch.eye(d, dtype=torch.float64)[torch.tensor([3, 0, 4, 1, 2])]     # keeps the all-ones direction
    g_o, b_o = 1 + torch.rand(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    norms_o, norms_n = {"attention_input": (g_o, b_o)}, {"attention_input": (g_o @ perm, b_o @ perm)}
    fit = AF.fit_pair(X_o, 4.0 * X_o @ perm, norms_o, norms_n, "layer", "layer")
    Z_o, _ = AF.normalised_rows(X_o, "layer")
    assert torch.allclose(Z_o.sum(dim=1), torch.zeros(200, dtype=torch.float64), atol=1e-12)
    U_o = AF.module_inputs(Z_o, g_o, b_o)
    U_n = AF.module_inputs(AF.normalised_rows(4.0 * X_o @ perm, "layer")[0], g_o @ perm, b_o @ perm)
    T = fit.inputs["attention_input"]
    assert _rel(U_n @ T.T, U_o) < 1e-5                   # the bias included: u_o = T u_n on every row (ridge 1e-6)
    assert _rel(T @ (b_o @ perm), b_o) < 1e-5 and abs(fit.scale - 4.0) < 1e-12


def test_rows_read_in_other_tokens_are_trimmed_and_noisy_rows_are_not():
    d, D = 6, 9
    X_o, X_n, M = _widened(d=d, D=D)
    bad = X_n.clone()
    bad[100:130] += 0.3 * torch.randn(30, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fit = AF.fit_pair(X_o, bad, {}, {}, "rms", "rms")
    assert abs(fit.kept - 370 / 400) < 1e-12                       # exactly the 30 perturbed rows dropped
    assert _rel(fit.Q, (D / d) ** 0.5 * M.T) < 1e-5
    noisy = X_n + 0.3 * X_n.norm(dim=1, keepdim=True) / D ** 0.5 * torch.randn(
        400, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert AF.fit_pair(X_o, noisy, {}, {}, "rms", "rms").kept == 1.0   # a real pair's spread: nothing dropped


def test_repeated_rows_count_once_and_do_not_set_the_trim():
    X_o, X_n, _ = _widened()
    noisy = X_n + 0.3 * X_n.norm(dim=1, keepdim=True) / 9 ** 0.5 * torch.randn(
        400, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    template_o, template_n = X_o[:1].repeat(600, 1), noisy[:1].repeat(600, 1)      # one row, 600 times
    fit = AF.fit_pair(torch.cat([template_o, X_o]), torch.cat([template_n, noisy]), {}, {}, "rms", "rms")
    alone = AF.fit_pair(X_o, noisy, {}, {}, "rms", "rms")
    assert fit.kept == 1.0 and _rel(fit.Q, alone.Q) < 1e-10


def test_captured_share_is_one_for_the_exact_map_and_zero_for_none():
    X_o, X_n, M = _widened()
    Z_o, _ = AF.normalised_rows(X_o, "rms")
    Z_n, _ = AF.normalised_rows(X_n, "rms")
    R = torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fit = AF.fit_pair(X_o, X_n, {}, {}, "rms", "rms")
    assert abs(AF.captured_share(Z_o, Z_n, R, R @ fit.inputs["attention_input"]) - 1.0) < 1e-9
    assert AF.captured_share(Z_o, Z_n, R, torch.zeros(2, 9, dtype=torch.float64)) == 0.0


def test_saved_fits_round_trip(tmp_path):
    X_o, X_n, _ = _widened()
    fits = {(0, 0): AF.fit_pair(X_o, X_n, {}, {}, "rms", "rms"),
            (1, 2): AF.fit_pair(X_o[:200], X_n[:200], {}, {}, "rms", "rms")}
    facts = AF.save_fits(fits, tmp_path / AF.FITS)
    back = AF.load_fits(tmp_path / AF.FITS)
    assert set(back) == {(0, 0), (1, 2)} and set(facts) == {"0->0", "1->2"}
    for key, fit in fits.items():
        assert torch.equal(back[key].Q, fit.Q.float().double()) and back[key].scale == fit.scale
        assert torch.equal(back[key].inputs["mlp_input"], fit.inputs["mlp_input"].float().double())
        assert back[key].r2 == fit.r2


def test_task_prompts_as_calibration_text_and_the_option_in_the_pair_keys(tmp_path):
    texts = calibration_texts("task:arithmetic:train:5", 2048)
    assert len(texts) == 5 and all("### Instruction:" in t and t.endswith("### Response:\n") for t in texts)
    assert calibration_texts("task:arithmetic:train:5", 2048) == texts           # deterministic: part of the key
    from lorasuite_core.testing.model import make_tiny_model_dir

    model = make_tiny_model_dir("llama", tmp_path / "m", seed=1)
    weights = plan_pair(str(model), str(model), AnalysisOptions())
    fitted = plan_pair(str(model), str(model), AnalysisOptions(transfer_fit="activations"))
    # the same activations entry unless the weight fit's forward runs in bf16 (plans.activations_dtype): the fit's is fp32
    assert fitted.activations_dtype == "float32"
    same_dtype = weights.activations_dtype == fitted.activations_dtype
    assert (weights.stage_keys["activations"] == fitted.stage_keys["activations"]) == same_dtype
    assert weights.stage_keys["head_similarity"] != fitted.stage_keys["head_similarity"]
