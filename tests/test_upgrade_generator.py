"""Tests of the ground-truth generator ``lorasuite_core.testing`` (tokenizer, model, upgrade, adapter) itself.

Every allowed ``UpgradeSpec`` field alone, and all of them combined, must give a new model whose
logits (fed the ids mapped through ``token_map``, columns taken at ``token_map``) equal the old
model's to 1e-5 relative in float32; a perturbed upgrade and a wrong token map must fail that
check, so the check can fail.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import FAMILIES, make_tiny_model_dir
from lorasuite_core.testing.tokenizer import make_tokenizer
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.testing.verification import load_model, logits_over_shared_vocab, relative_max_error, sequence_logits

TOL = 1e-5

SINGLE = {
    "identity": UpgradeSpec(),
    "rotate_residual": UpgradeSpec(rotate_residual=True, seed=1),
    "widen_residual": UpgradeSpec(widen_residual=16, seed=2),
    "fold_norms": UpgradeSpec(fold_norms=True),
    "permute_heads": UpgradeSpec(permute_heads=True, seed=3),
    "extra_query_heads_per_group": UpgradeSpec(extra_query_heads_per_group=2, seed=4),
    "kv_replication": UpgradeSpec(kv_replication=2),
    "permute_neurons": UpgradeSpec(permute_neurons=True, seed=5),
    "extra_neurons": UpgradeSpec(extra_neurons=24, seed=6),
    "identity_layers": UpgradeSpec(identity_layers=(0, 3), seed=7),
    "extra_vocab": UpgradeSpec(extra_vocab=12, seed=8),
    "renumber_vocab": UpgradeSpec(renumber_vocab=True, seed=9),
}
NOT_FOR_NEOX = {"widen_residual", "extra_query_heads_per_group", "kv_replication"}
# hidden 64 + 32 = 96, heads 4 kv groups * (2/2 + 2) = 12: 96 % 12 == 0 as transformers requires.
ALL = dict(rotate_residual=True, widen_residual=32, fold_norms=True, permute_heads=True, extra_query_heads_per_group=2,
           kv_replication=2, permute_neurons=True, extra_neurons=8, identity_layers=(1, 4), extra_vocab=9,
           renumber_vocab=True, seed=11)
ALL_NEOX = {k: v for k, v in ALL.items() if k not in NOT_FOR_NEOX}
# BLOOM: ALiBi slopes depend on a head's index and on the head count, the MLP is exactly 4 x hidden.
NOT_FOR_BLOOM = NOT_FOR_NEOX | {"permute_heads", "extra_neurons"}
ALL_BLOOM = {k: v for k, v in ALL.items() if k not in NOT_FOR_BLOOM}
UNSUPPORTED = {"gpt_neox": NOT_FOR_NEOX, "bloom": NOT_FOR_BLOOM}


def combined(family):
    if family == "gpt_neox":
        return {"all_combined": UpgradeSpec(**ALL_NEOX)}
    if family == "bloom":
        return {"all_combined": UpgradeSpec(**ALL_BLOOM)}
    no_fold = dict(ALL, fold_norms=False, identity_layers=(0,), seed=12)
    return {"all_combined": UpgradeSpec(**ALL), "all_combined_no_fold": UpgradeSpec(**no_fold)}


def cases():
    for family in FAMILIES:
        specs = {k: v for k, v in SINGLE.items() if k not in UNSUPPORTED.get(family, ())}
        specs.update(combined(family))
        for name, spec in specs.items():
            yield pytest.param(family, name, spec, id=f"{family}-{name}")


def random_ids(vocab: int, seed: int, n: int = 3, length: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def config_of(model_dir):
    """The config through transformers (BLOOM writes n_layer / n_head and has no intermediate size)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    return {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "hidden": cfg.hidden_size, "inter": inter}


def token_map_of(new_dir) -> dict[int, int]:
    return {int(k): v for k, v in read_json(new_dir / "lorasuite_upgrade.json")["token_map"].items()}


def new_logits(new_dir, ids, token_map=None):
    tm = token_map if token_map is not None else token_map_of(new_dir)
    logits = sequence_logits(load_model(new_dir), [[tm[t] for t in seq] for seq in ids])
    return logits[:, [tm[i] for i in range(len(tm))]]


@pytest.fixture(scope="module")
def old_models(tmp_path_factory):
    """family -> (model dir, token ids, old logits); built once per module."""
    built = {}

    def get(family):
        if family not in built:
            d = make_tiny_model_dir(family, tmp_path_factory.mktemp(f"gen-{family}") / "model", seed=3)
            vocab = read_json(d / "config.json")["vocab_size"]
            ids = random_ids(vocab, seed=FAMILIES.index(family))
            built[family] = (d, ids, sequence_logits(load_model(d), ids))
        return built[family]

    return get


@pytest.fixture(scope="module")
def upgraded(old_models, tmp_path_factory):
    cache = {}

    def get(family, name, spec):
        if (family, name) not in cache:
            old_dir = old_models(family)[0]
            cache[family, name] = upgrade_model_dir(old_dir, tmp_path_factory.mktemp(f"up-{family}-{name}"), spec)
        return cache[family, name]

    return get


@pytest.mark.parametrize("family,name,spec", list(cases()))
def test_upgrade_preserves_logits(family, name, spec, old_models, upgraded):
    old_dir, ids, old = old_models(family)
    new_dir = upgraded(family, name, spec)
    new = new_logits(new_dir, ids)
    assert old.abs().max() > 1.0 and old.std(dim=-1).min() > 0.1, "degenerate old model"
    err = relative_max_error(old, new)
    assert err <= TOL, f"{family}/{name}: relative max logit error {err:.3g}"

    truth = read_json(new_dir / "lorasuite_upgrade.json")
    cfg_old, cfg_new = read_json(old_dir / "config.json"), read_json(new_dir / "config.json")
    n_old = cfg_old["vocab_size"]
    token_map = truth["token_map"]
    assert sorted(int(k) for k in token_map) == list(range(n_old))
    assert len(set(token_map.values())) == n_old and max(token_map.values()) < cfg_new["vocab_size"]
    assert cfg_new["vocab_size"] == n_old + spec.extra_vocab
    layer_map = {int(k): v for k, v in truth["layer_map"].items()}
    dims_old, dims_new = config_of(old_dir), config_of(new_dir)
    assert sorted(layer_map) == list(range(dims_old["layers"]))
    assert list(layer_map.values()) == sorted(layer_map.values())
    assert set(layer_map.values()).isdisjoint(spec.identity_layers)
    assert dims_new["layers"] == dims_old["layers"] + len(spec.identity_layers)
    assert dims_new["hidden"] == dims_old["hidden"] + spec.widen_residual
    assert dims_new["inter"] == dims_old["inter"] + spec.extra_neurons
    if family not in ("gpt_neox", "bloom"):
        kv, r = cfg_old["num_key_value_heads"], spec.kv_replication
        group = cfg_old["num_attention_heads"] // kv
        assert cfg_new["num_key_value_heads"] == kv * r and cfg_new["head_dim"] == cfg_old["head_dim"]
        assert cfg_new["num_attention_heads"] == kv * r * (group // r + spec.extra_query_heads_per_group)
    if "layer_types" in cfg_old and cfg_old["layer_types"] is not None:
        types = cfg_new["layer_types"]
        assert len(types) == cfg_new["num_hidden_layers"]
        assert all(types[j] == cfg_old["layer_types"][i] for i, j in layer_map.items())
        for p in spec.identity_layers:  # inserted layers copy a neighbour's attention type
            assert types[p] in {types[q] for q in (p - 1, p + 1) if 0 <= q < len(types)}
    T = load_file(new_dir / "lorasuite_upgrade.safetensors")["residual"]
    assert T.shape == (cfg_new["hidden_size"], cfg_old["hidden_size"])
    c2 = cfg_new["hidden_size"] / cfg_old["hidden_size"]
    assert torch.allclose(T.T @ T, c2 * torch.eye(T.shape[1], dtype=T.dtype), atol=1e-9)


def test_residual_transform_maps_hidden_states(old_models, upgraded):
    """``h_new = T h_old`` at every layer boundary (the ground truth file is right)."""
    old_dir, ids, _ = old_models("gemma3")
    new_dir = upgraded("gemma3", "all_combined", combined("gemma3")["all_combined"])
    truth = read_json(new_dir / "lorasuite_upgrade.json")
    tm = token_map_of(new_dir)
    layer_map = {int(k): v for k, v in truth["layer_map"].items()}
    T = load_file(new_dir / "lorasuite_upgrade.safetensors")["residual"]
    with torch.no_grad():
        ho = load_model(old_dir)(torch.tensor(ids[:1]), output_hidden_states=True).hidden_states
        hn = load_model(new_dir)(torch.tensor([[tm[t] for t in ids[0]]]), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, [i + 1] the output of layer i (the last one is normed).
    pairs = [(0, 0)] + [(i + 1, layer_map[i] + 1) for i in range(len(ho) - 2)]
    for i, j in pairs:
        a = ho[i][0].double() @ T.T
        assert relative_max_error(a, hn[j][0].double()) < 1e-5


def _added_and_old_logits(new_dir, ids):
    """Full-vocabulary logits of the upgraded model, split into added tokens and old tokens (in old order)."""
    tm = token_map_of(new_dir)
    full = sequence_logits(load_model(new_dir), [[tm[t] for t in seq] for seq in ids]).double()
    added = sorted(set(range(full.shape[-1])) - set(tm.values()))
    return full[..., added], full[..., [tm[i] for i in range(len(tm))]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_never_picks_an_added_token(family, old_models, upgraded):
    """Added tokens' logits are the mean of the old ones (before a soft-cap), so never the maximum."""
    old_dir, ids, _ = old_models(family)
    spec = combined(family)["all_combined"]
    added, old = _added_and_old_logits(upgraded(family, "all_combined", spec), ids)
    assert added.shape[-1] == spec.extra_vocab
    assert (added.max(dim=-1).values < old.max(dim=-1).values).all()
    if read_json(old_dir / "config.json").get("final_logit_softcapping") is None:
        mean = old.mean(dim=-1, keepdim=True).expand_as(added)
        assert relative_max_error(mean, added) < 1e-5


def test_random_added_logits_keep_old_logits_and_can_win(old_models, tmp_path):
    """The first behaviour, kept for reproducibility: random rows, old logits still exact."""
    old_dir, ids, old = old_models("llama")
    spec = UpgradeSpec(extra_vocab=400, added_token_logits="random", seed=8)
    added, new = _added_and_old_logits(upgrade_model_dir(old_dir, tmp_path / "random", spec), ids)
    assert relative_max_error(old, new) <= TOL
    assert (added.max(dim=-1).values > new.max(dim=-1).values).any()
    with pytest.raises(ValueError, match="added_token_logits"):
        upgrade_model_dir(old_dir, tmp_path / "bad", UpgradeSpec(extra_vocab=4, added_token_logits="zero"))


def test_perturbed_upgrade_fails_the_check(old_models, upgraded, tmp_path):
    old_dir, ids, old = old_models("llama")
    good = upgraded("llama", "all_combined", combined("llama")["all_combined"])
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    sd = load_file(bad / "model.safetensors")
    layer = read_json(good / "lorasuite_upgrade.json")["layer_map"]["0"]
    key = f"model.layers.{layer}.mlp.down_proj.weight"
    sd[key][3, 5] += 0.05  # one weight
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert relative_max_error(old, new_logits(good, ids)) <= TOL
    assert relative_max_error(old, new_logits(bad, ids)) > 100 * TOL


def test_wrong_token_map_fails_the_check(old_models, upgraded):
    old_dir, ids, old = old_models("qwen2")
    new_dir = upgraded("qwen2", "renumber_vocab", SINGLE["renumber_vocab"])
    tm = token_map_of(new_dir)
    a, b = ids[0][0], ids[0][1]
    wrong = dict(tm)
    wrong[a], wrong[b] = tm[b], tm[a]
    assert relative_max_error(old, new_logits(new_dir, ids, tm)) <= TOL
    assert relative_max_error(old, new_logits(new_dir, ids, wrong)) > 100 * TOL


@pytest.mark.parametrize("family", ["llama", "gemma3", "bloom"])
def test_tied_embeddings(family, tmp_path):
    old = make_tiny_model_dir(family, tmp_path / "old", seed=5, tie_word_embeddings=True, num_hidden_layers=2)
    ids = random_ids(read_json(old / "config.json")["vocab_size"], seed=1)
    ref = sequence_logits(load_model(old), ids)
    bloom = family == "bloom"  # real BLOOM checkpoints are tied; its residual only permutes
    first = UpgradeSpec(rotate_residual=bloom, widen_residual=0 if bloom else 16, extra_vocab=5, renumber_vocab=True)
    widen = upgrade_model_dir(old, tmp_path / "widen", first)
    assert read_json(widen / "config.json")["tie_word_embeddings"] is True
    assert relative_max_error(ref, new_logits(widen, ids)) <= TOL
    spec = UpgradeSpec(**dict(ALL_BLOOM if bloom else ALL, identity_layers=(2,)))
    everything = upgrade_model_dir(old, tmp_path / "all", spec)
    # gemma3's signed permutation and bloom's permutation keep lm_head == embedding; llama's rotation
    # folds the final norm into lm_head, so the upgraded llama is written untied.
    assert read_json(everything / "config.json")["tie_word_embeddings"] is (family != "llama")
    assert relative_max_error(ref, new_logits(everything, ids)) <= TOL


def test_tokenizer_ground_truth(old_models, upgraded):
    from transformers import AutoTokenizer

    for family in ("llama", "gemma3"):
        old_dir = old_models(family)[0]
        new_dir = upgraded(family, "all_combined", combined(family)["all_combined"])
        old_tok, new_tok = AutoTokenizer.from_pretrained(old_dir), AutoTokenizer.from_pretrained(new_dir)
        truth = read_json(new_dir / "lorasuite_upgrade.json")
        tm = token_map_of(new_dir)
        assert len(new_tok) == len(old_tok) + 9
        assert all(old_tok.convert_ids_to_tokens(i) == new_tok.convert_ids_to_tokens(j) for i, j in tm.items())
        new_strings = truth["new_token_strings"]
        assert len(new_strings) == 9 and not set(new_strings) & set(old_tok.get_vocab())
        assert [new_tok.convert_ids_to_tokens(i) for i in truth["new_token_ids"]] == new_strings
        text = "The children were playing in the park until the sun went down."
        assert [tm[i] for i in old_tok(text).input_ids] == new_tok(text).input_ids
        cfg = read_json(new_dir / "config.json")
        assert cfg["eos_token_id"] == new_tok.eos_token_id == tm[old_tok.eos_token_id]


def test_tokenizers_are_small_deterministic_and_styled(tmp_path):
    a = make_tokenizer("byte_bpe", tmp_path / "a")
    b = make_tokenizer("byte_bpe", tmp_path / "b", extra_tokens=["<|tool|>"])
    m = make_tokenizer("metaspace", tmp_path / "m")
    assert 400 <= len(a) <= 600 and 400 <= len(m) <= 600
    assert len(b) == len(a) + 1 and b.convert_tokens_to_ids("<|tool|>") == len(a)
    make_tokenizer("byte_bpe", tmp_path / "c")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()
    assert a.get_vocab() == {k: v for k, v in b.get_vocab().items() if k != "<|tool|>"}
    assert "Ġthe" in a.get_vocab() and "▁the" in m.get_vocab()
    assert a.decode(a("Hello world, 123 apples.").input_ids) == "Hello world, 123 apples."


def test_generated_models_are_not_trivial(old_models):
    for family in FAMILIES:
        d = old_models(family)[0]
        sd = load_file(d / "model.safetensors")
        cfg = read_json(d / "config.json")
        norms = [v for k, v in sd.items() if "norm" in k and k.endswith("weight")]
        assert norms
        if family == "gemma3":
            assert cfg["model_type"] == "gemma3_text"
            assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"} and cfg["sliding_window"] < 12
            assert all((1 + w).abs().min() > 0.3 and w.abs().max() > 0.1 for w in norms)
        else:
            assert all(w.abs().min() > 0.3 and (w - 1).abs().max() > 0.1 for w in norms)
        if family == "qwen2":
            assert all(sd[f"model.layers.0.self_attn.{p}_proj.bias"].abs().min() > 0 for p in "qkv")
        if family in ("gpt_neox", "bloom"):
            assert all(v.abs().max() > 0.05 for k, v in sd.items() if "layernorm" in k and k.endswith("bias"))
        if family == "gpt_neox":
            assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5 and cfg["use_parallel_residual"]
        elif family == "bloom":
            assert (cfg["hidden_size"], cfg["n_head"], cfg["n_layer"]) == (64, 4, 3)
            assert not cfg["apply_residual_connection_post_layernorm"]
            assert "transformer.word_embeddings_layernorm.bias" in sd and "transformer.h.0.self_attention.dense.bias" in sd
        else:
            assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (64, 4, 2, 16)
        assert cfg["tie_word_embeddings"] is False and config_of(d)["layers"] == 3


def test_random_lora_adapter_changes_logits_and_survives_vocab_upgrade(old_models, upgraded, tmp_path):
    for family in ("gpt_neox", "gemma3", "bloom"):
        old_dir, ids, old = old_models(family)
        adapter = make_random_lora_adapter(old_dir, tmp_path / f"adapter-{family}", seed=1)
        cfg = read_json(adapter / "adapter_config.json")
        expected = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} if family in ("gpt_neox", "bloom") else \
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert set(cfg["target_modules"]) == expected
        weights = load_file(adapter / "adapter_model.safetensors")
        assert weights and all(w.abs().min() > 0 for w in weights.values())  # A and B both random
        with_adapter = sequence_logits(load_model(old_dir, adapter), ids)
        assert relative_max_error(old, with_adapter) > 0.3
        # a vocabulary-only upgrade leaves every module shape alone: the same adapter stays valid.
        new_dir = upgraded(family, "renumber_vocab", SINGLE["renumber_vocab"])
        ref, got = logits_over_shared_vocab(old_dir, new_dir, ids, old_adapter=adapter, new_adapter=adapter)
        assert torch.equal(ref, with_adapter)
        assert relative_max_error(ref, got) <= TOL


@pytest.mark.parametrize(
    "family,spec,match",
    [
        ("gpt_neox", UpgradeSpec(widen_residual=8), "widen_residual"),
        ("gpt_neox", UpgradeSpec(kv_replication=2), "kv_replication"),
        ("gpt_neox", UpgradeSpec(extra_query_heads_per_group=1), "extra_query_heads_per_group"),
        ("bloom", UpgradeSpec(permute_heads=True), "permute_heads.*ALiBi"),
        ("bloom", UpgradeSpec(extra_query_heads_per_group=1), "extra_query_heads_per_group.*ALiBi"),
        ("bloom", UpgradeSpec(kv_replication=2), "kv_replication"),
        ("bloom", UpgradeSpec(widen_residual=8), "widen_residual.*LayerNorm"),
        ("bloom", UpgradeSpec(extra_neurons=8), "extra_neurons.*4 \\* hidden_size"),
        ("llama", UpgradeSpec(kv_replication=4), "must divide"),
        ("llama", UpgradeSpec(extra_query_heads_per_group=1), "hidden_size % num_attention_heads"),
        ("qwen2", UpgradeSpec(identity_layers=(0, 0)), "identity_layers"),
        ("qwen2", UpgradeSpec(identity_layers=(4,)), "identity_layers"),
        ("gemma3", UpgradeSpec(extra_neurons=-1), "extra_neurons"),
    ],
)
def test_unsupported_specs_raise(family, spec, match, old_models, tmp_path):
    with pytest.raises(ValueError, match=match):
        upgrade_model_dir(old_models(family)[0], tmp_path / "new", spec)


def test_bloom_head_index_is_part_of_its_function(old_models, tmp_path, monkeypatch):
    """Why the generator refuses permute_heads for bloom: ALiBi slopes follow the head index.

    Swapping two heads of the fused query_key_value (rows [head][q|k|v][head_dim], biases too)
    together with their dense columns changes a bloom model's logits, because each head now
    attends with the other's slope; with the ALiBi biases zeroed the same swap is exact.
    """
    from transformers.models.bloom import modeling_bloom

    old_dir, ids, old = old_models("bloom")
    sd = load_file(old_dir / "model.safetensors")
    H, hd = 4, 16
    order = torch.tensor([1, 0, 2, 3])
    for key, t in list(sd.items()):
        if key.endswith("self_attention.query_key_value.weight"):
            sd[key] = t.view(H, 3 * hd, -1)[order].reshape(t.shape).contiguous()
        elif key.endswith("self_attention.query_key_value.bias"):
            sd[key] = t.view(H, 3 * hd)[order].reshape(t.shape).contiguous()
        elif key.endswith("self_attention.dense.weight"):
            sd[key] = t.view(t.shape[0], H, hd)[:, order].reshape(t.shape).contiguous()
    swapped = tmp_path / "swapped"
    shutil.copytree(old_dir, swapped)
    save_file(sd, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    assert relative_max_error(old, sequence_logits(load_model(swapped), ids)) > 100 * TOL
    monkeypatch.setattr(modeling_bloom, "_get_alibi_slopes", lambda heads, device: torch.zeros(heads, device=device))
    no_alibi = sequence_logits(load_model(old_dir), ids)
    assert relative_max_error(no_alibi, sequence_logits(load_model(swapped), ids)) <= TOL
