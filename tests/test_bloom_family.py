"""BLOOM read from its architecture JSON: dims from either config naming, what the first layer
receives (embedding LayerNorm), the fused query_key_value split, ALiBi flagged as data.

References are transformers' own BloomForCausalLM modules on the same checkpoint.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.families import all_families, family_for_model_type
from lorasuite_core.models.loading import load_base_model
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.verification import load_model
from lorasuite_core.transfer.layer_weights import layer_weights


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    return make_tiny_model_dir("bloom", tmp_path_factory.mktemp("bloom") / "model", seed=4, num_hidden_layers=2)


def test_dims_from_either_config_naming(bloom_dir, tmp_path):
    dims = load_base_model(bloom_dir).dims
    assert (dims.hidden, dims.num_layers, dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.intermediate,
            dims.norm_eps) == (64, 2, 4, 4, 16, 256, 1e-5)
    # bigscience/bloom-560m style: n_embed and num_attention_heads instead of hidden_size and n_head
    other = tmp_path / "other"
    shutil.copytree(bloom_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["n_embed"], config["num_attention_heads"] = config.pop("hidden_size"), config.pop("n_head")
    (other / "config.json").write_text(json.dumps(config))
    assert load_base_model(other).dims == dims
    del config["n_embed"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorasuiteError, match="config.json lacks .*hidden_size.*n_embed"):
        load_base_model(other)


def test_effective_embeddings_are_what_the_first_layer_receives(bloom_dir):
    model = load_model(bloom_dir)
    ids = torch.arange(model.config.vocab_size)
    with torch.no_grad():
        reference = model.transformer.word_embeddings_layernorm(model.transformer.word_embeddings(ids)).double()
    mine = load_base_model(bloom_dir).effective_embeddings()
    raw = model.transformer.word_embeddings.weight.double()
    assert (mine - reference).abs().max() < 1e-5 * reference.abs().max()
    assert (raw - reference).abs().max() > 0.5  # the norm matters


def test_fused_qkv_split_matches_the_model(bloom_dir):
    model = load_model(bloom_dir)
    attention = model.transformer.h[1].self_attention
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = attention.query_key_value(x) - attention.query_key_value.bias
        q, k, v = attention._reshape(fused)             # [1, heads, 5, head_dim] each
    weights = layer_weights(load_base_model(bloom_dir), 1)
    for role, reference in zip("qkv", (q, k, v)):
        mine = (x.double() @ weights[role].T).view(1, 5, 4, 16).transpose(1, 2)
        assert (mine - reference.double()).abs().max() < 1e-5
    assert set(weights) == {"q", "k", "v", "o", "up", "down"}


def test_alibi_is_data():
    bloom = family_for_model_type("bloom")
    assert bloom.position_encoding == "alibi" and bloom.head_index_fixed
    assert bloom.embedding_norm == "transformer.word_embeddings_layernorm" and bloom.intermediate_per_hidden == 4
    others = [f for name, f in all_families().items() if name != "bloom"]
    assert others and all(f.position_encoding == "rotary" and not f.head_index_fixed and f.embedding_norm is None
                          and not f.config_requires and f.intermediate_per_hidden is None
                          for f in others)


def test_residual_from_the_normed_input_is_refused(bloom_dir, tmp_path):
    other = tmp_path / "post_ln_residual"
    shutil.copytree(bloom_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["apply_residual_connection_post_layernorm"] = True
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorasuiteError, match="apply_residual_connection_post_layernorm=True is not supported"):
        load_base_model(other)
    del config["apply_residual_connection_post_layernorm"]   # absent: transformers' default, False
    (other / "config.json").write_text(json.dumps(config))
    assert load_base_model(other).dims == load_base_model(bloom_dir).dims


def test_alibi_heads_keep_their_indices(tmp_path):
    """Hungarian matching would permute the heads of two unrelated BLOOM models; under ALiBi a head's index is
    part of its function, so the pair is matched head h to head h (a llama pair of the same weights is not)."""
    from lorasuite_core.transfer.adapter import effective_head_mapping, match_layer_pair
    from lorasuite_core.transfer.matching import match_layer
    from lorasuite_core.transfer.adapter import layer_pair_maps
    from lorasuite_core.transfer.residual import residual_transfer
    from lorasuite_core.transfer.vocab import shared_vocabulary

    old = load_base_model(make_tiny_model_dir("bloom", tmp_path / "a", seed=4, num_hidden_layers=1))
    new = load_base_model(make_tiny_model_dir("bloom", tmp_path / "b", seed=9, num_hidden_layers=1))
    rt = residual_transfer(old, new, shared_vocabulary(old.tokenizer(), new.tokenizer()))
    free = match_layer(layer_weights(old, 0), layer_weights(new, 0), old.dims, new.dims,
                       layer_pair_maps(old, new, rt, 0, 0), "hungarian")
    assert free.head_pairs != [(h, h) for h in range(4)]          # what matching alone would do
    assert effective_head_mapping(old, new, "hungarian") == "identity"
    assert match_layer_pair(old, new, rt, 0, 0, "hungarian").head_pairs == [(h, h) for h in range(4)]
    llama = load_base_model(make_tiny_model_dir("llama", tmp_path / "c", seed=4, num_hidden_layers=1))
    assert effective_head_mapping(llama, llama, "hungarian") == "hungarian"
