"""Numerical building blocks against direct references."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lorasuite_core.transfer.cka import minibatch_cka
from lorasuite_core.transfer.layer_mapping import map_layers
from lorasuite_core.models.loading import Dims
from lorasuite_core.transfer.matching import LayerMatch, head_similarity
from lorasuite_core.transfer.refactor import refactorise
from lorasuite_core.transfer.unit_maps import LayerTransfer
from lorasuite_core.models.tokens import token_bytes



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def unbiased_hsic_reference(X, Y):
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def test_cka_matches_reference_per_pair():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(3, 40, 8))
    new = rng.normal(size=(2, 40, 5))
    new[1] = old[0] @ rng.normal(size=(8, 5)) + 0.1 * new[1]
    got = minibatch_cka(old, new, batch_size=40)
    for i, j in itertools.product(range(3), range(2)):
        x, y = old[i], new[j]
        expected = unbiased_hsic_reference(x, y) / np.sqrt(unbiased_hsic_reference(x, x) * unbiased_hsic_reference(y, y))
        assert got[i, j] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cka_invariant_to_rotation_and_scale_and_zero_layer_is_zero():
    rng = np.random.default_rng(1)
    old = rng.normal(size=(2, 300, 6))
    R, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    widened = np.concatenate([old, np.zeros((2, 300, 3))], axis=2) @ R.T * 3.0
    new = np.concatenate([np.zeros((1, 300, 9)), widened], axis=0)
    cka = minibatch_cka(old, new, batch_size=100)
    assert cka[0, 0] == 0 and cka[1, 0] == 0
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-9) and cka[1, 2] == pytest.approx(1.0, abs=1e-9)
    assert cka[0, 2] < 0.5


def brute_force_mapping(S, offset):
    L_o, L_n = S.shape
    growing = L_o <= L_n
    cap = 1 if growing else -(-L_o // L_n)
    best, best_map = -np.inf, None
    candidates = itertools.combinations(range(L_n), L_o) if growing else itertools.combinations_with_replacement(range(L_n), L_o)
    for m in candidates:
        if max(m.count(j) for j in set(m)) > cap:
            continue
        if all(0 <= ((j - i) if growing else (i - j)) <= offset for i, j in enumerate(m)):
            score = sum(S[i, j] for i, j in enumerate(m))
            if score > best + 1e-12:
                best, best_map = score, m
    return list(enumerate(best_map))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (5, 7), (6, 3), (7, 4), (9, 4)])
def test_layer_mapping_is_the_best_monotone_mapping(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        S = rng.random(shape)
        offset = abs(shape[1] - shape[0])
        assert map_layers(S, offset) == brute_force_mapping(S, offset)


def test_shallower_model_spreads_old_layers():
    S = np.full((6, 3), 0.1)
    S[:, 1] = 1.0                           # one new layer looks like every old layer
    mapping = [j for _, j in map_layers(S)]
    assert max(mapping.count(j) for j in set(mapping)) <= 2


def test_surface_forms_meet_across_tokenizer_styles():
    from lorasuite_core.models.tokens import _byte_level_decoder

    assert _byte_level_decoder()["Ġ"] == ord(" ")
    assert token_bytes("Ġthe", "byte_level") == token_bytes("▁the", "metaspace") == b" the"
    assert token_bytes("the", "byte_level") == b"the" != token_bytes("▁the", "metaspace")
    assert token_bytes("<0x0A>", "metaspace") == token_bytes("Ċ", "byte_level") == b"\n"


def test_refactorise_reproduces_low_rank_and_reports_truncation():
    g = torch.Generator().manual_seed(0)
    delta = 0.5 * torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    exact = refactorise(delta, rank=4, scaling=0.5)
    assert exact.A.shape == (4, 30) and exact.B.shape == (20, 4)
    assert torch.allclose(0.5 * exact.B.double() @ exact.A.double(), delta, atol=1e-5)
    assert exact.residual < 1e-6
    truncated = refactorise(delta, rank=2, scaling=0.5)
    U, S, _ = torch.linalg.svd(delta / 0.5)
    assert truncated.residual == pytest.approx(float(S[2:].norm() / S.norm()), rel=1e-5)


def _random_attention(H, KV, hd, d, g):
    return {"q": torch.randn(H * hd, d, generator=g), "k": torch.randn(KV * hd, d, generator=g),
            "v": torch.randn(KV * hd, d, generator=g), "o": torch.randn(d, H * hd, generator=g)}


def test_head_similarity_matches_explicit_interaction_matrices():
    g = torch.Generator().manual_seed(1)
    do, dn = Dims(12, 1, 4, 2, 3, 8, 1e-6), Dims(10, 1, 2, 1, 5, 8, 1e-6)
    old_w, new_w = _random_attention(4, 2, 3, 12, g), _random_attention(2, 1, 5, 10, g)
    T_in, T_out = torch.randn(12, 10, generator=g), torch.randn(10, 12, generator=g)
    got = head_similarity(old_w, new_w, do, dn, T_in, T_out)

    def qk_vo(w, d, i, T_in=None, T_out=None):
        hd, g_i = d.head_dim, i // d.heads_per_group
        Q, K = w["q"][i * hd:(i + 1) * hd], w["k"][g_i * hd:(g_i + 1) * hd]
        V, O = w["v"][g_i * hd:(g_i + 1) * hd], w["o"][:, i * hd:(i + 1) * hd]
        if T_in is not None:
            Q, K, V, O = Q @ T_in, K @ T_in, V @ T_in, T_out @ O
        return Q.T @ K, O @ V

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    for i, j in itertools.product(range(4), range(2)):
        qk_o, vo_o = qk_vo(old_w, do, i, T_in, T_out)
        qk_n, vo_n = qk_vo(new_w, dn, j)
        assert got[i, j] == pytest.approx(cos(qk_o, qk_n) + cos(vo_o, vo_n), rel=1e-9)


def _rotation_case(seed=2, H=3, hd=4, d=12):
    g = torch.Generator().manual_seed(seed)
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    old_w = _random_attention(H, H, hd, d, g)
    new_w = {"q": old_w["q"] @ R.T, "k": old_w["k"] @ R.T, "v": old_w["v"] @ R.T, "o": R @ old_w["o"]}
    dims = Dims(d, 1, H, H, hd, 8, 1e-6)
    match = LayerMatch([(i, i) for i in range(H)], [(i, i) for i in range(H)], np.zeros((0, 2), dtype=int), np.eye(H), 0.0)
    maps = {"attention_input": R.T, "attention_output": R, "mlp_input": R.T, "mlp_output": R}
    delta = torch.randn(H * hd, d, generator=g)
    return old_w, new_w, dims, match, maps, delta, R


def test_lstsq_head_transform_is_exact_under_rotation():
    old_w, new_w, dims, match, maps, delta, R = _rotation_case()
    carried = LayerTransfer(old_w, new_w, dims, dims, maps, match, "lstsq", R.T).run({"q": delta, "o": delta.T})
    assert torch.allclose(carried["q"], delta @ R.T, atol=1e-10)
    assert torch.allclose(carried["o"], R @ delta.T, atol=1e-10)


def test_paper_head_transform_follows_eq3_and_is_not_exact(monkeypatch):
    from lorasuite_core.transfer import unit_maps

    # the formula to 1e-10: the W_old · P products in float64 (the pipeline runs them in float32, whose rounding
    # tests/test_unit_maps.py bounds)
    monkeypatch.setattr(unit_maps, "CARRY_DTYPE", torch.float64)
    old_w, new_w, dims, match, maps, delta, R = _rotation_case()
    P, hd = R.T, dims.head_dim
    carried = LayerTransfer(old_w, new_w, dims, dims, maps, match, "paper", P).run({"q": delta})["q"]
    for h in range(dims.num_heads):
        rows = slice(h * hd, (h + 1) * hd)
        W_old, W_new = old_w["q"][rows], new_w["q"][rows]
        expected = (W_old @ P @ W_new.T).T @ delta[rows] @ P
        assert torch.allclose(carried[rows], expected, atol=1e-10)
    exact = delta @ R.T
    assert float((carried - exact).norm() / exact.norm()) > 1.0


def test_ordinary_piece_beats_byte_fallback_with_a_lower_id():
    """SentencePiece vocabularies (Gemma's) hold "<0x35>" at a low id and "5" later; the encoder writes
    "5", so the shared vocabulary must pair the other tokenizer's "5" with it, not with the fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorasuite_core.transfer.vocab import shared_vocabulary, surface_forms

    vocab = {"<unk>": 0, "<0x35>": 1, "<0x20>": 2, "<0x0A>": 3, "5": 4, "▁": 5, "▁the": 6, "▁▁": 7}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    sp_fast = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>")
    assert sp_fast("5", add_special_tokens=False)["input_ids"] == [4]      # what the encoder writes
    forms = surface_forms(sp_fast)
    assert forms[b"5"] == 4 and forms[b" "] == 5 and forms[b" the"] == 6
    assert forms[b"\n"] == 3                                               # no ordinary piece: the fallback

    bl = Tokenizer(models.BPE(vocab={"5": 0, "Ġ": 1, "Ċ": 2, "Ġthe": 3}, merges=[]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    shared = shared_vocabulary(PreTrainedTokenizerFast(tokenizer_object=bl), sp_fast).old_to_new()
    assert shared == {0: 4, 1: 5, 2: 3, 3: 6}
