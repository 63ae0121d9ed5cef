"""Calibration forward passes streamed layer by layer equal the whole-model forward."""
from __future__ import annotations

import logging

import pytest
import torch

from lorasuite_core.transfer import activations
from lorasuite_core.transfer.activations import (
    _paired_texts,
    builtin_calibration_texts,
    paired_activations,
    streamed_states,
    whole_model_states,
)
from lorasuite_core.models.loading import LoadedModel, load_base_model
from lorasuite_core.testing.model import make_tiny_model_dir

CASES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},     # biases on q/k/v; lm_head is the embedding
    "gemma3": {"num_hidden_layers": 5},         # sliding (window 4) and full layers, scaled embeddings
    "gpt_neox": {},                             # parallel residual, partial rotary
    "bloom": {"num_hidden_layers": 4},          # ALiBi bias, embedding LayerNorm, fused QKV; takes output[0]
}


def _batches(base: LoadedModel, batch_size: int = 8, texts: int = 30, per_text: int = 48):
    tok = base.tokenizer()
    pairs, _ = _paired_texts(tok, tok, builtin_calibration_texts()[:texts], 10_000, per_text)
    batches = [[p[0] for p in pairs[s:s + batch_size]] for s in range(0, len(pairs), batch_size)]
    return batches, [p[1] for p in pairs]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {family: load_base_model(make_tiny_model_dir(family, root / family, seed=3, **overrides))
            for family, overrides in CASES.items()}


@pytest.mark.parametrize("family", list(CASES))
def test_streamed_states_equal_whole_model(tiny_models, family):
    base = tiny_models[family]
    batches, positions = _batches(base)
    assert len(batches) >= 2 and len({len(ids) for b in batches for ids in b}) > 1   # padding is exercised
    read = []
    real_get = type(base.weights).get

    def get(self, name, rows=None):
        read.append((name, None if rows is None else len(rows)))
        return real_get(self, name, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(base.weights), "get", get)
        streamed = streamed_states(base, batches, positions)
    used = {0, *(t for b in batches for ids in b for t in ids)}        # the texts' ids and the padding
    assert (base.family.embedding, len(used)) in read and (base.family.embedding, None) not in read
    assert len(used) < base.config["vocab_size"]                        # so a whole-table read would show
    whole = whole_model_states(base, batches, positions)
    assert streamed.shape == whole.shape == (base.dims.num_layers + 1, sum(map(len, positions)), base.dims.hidden)
    assert (streamed - whole).abs().max().item() <= 1e-5
    # every layer changes the state (the comparison is not between inputs carried through unchanged)
    assert all((streamed[i + 1] - streamed[i]).abs().max() > 1e-3 for i in range(base.dims.num_layers))


def test_streamed_holds_one_decoder_layer_and_never_the_whole_model(tiny_models, monkeypatch):
    base = tiny_models["gemma3"]
    batches, positions = _batches(base)
    real_load = activations._load_layer
    resident: list[int] = []

    seen = []

    def spy_load(b, layer, index):
        real_load(b, layer, index)
        seen.append(layer)
        loaded = [m for m in seen if not next(m.parameters()).is_meta]
        resident.append(len(loaded))

    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(activations, "_load_layer", spy_load)
    monkeypatch.setattr(LoadedModel, "load_torch_model", refuse)
    states = streamed_states(base, batches, positions)
    assert resident == [1] * base.dims.num_layers
    assert all(next(m.parameters()).is_meta for m in seen)          # the last layer is freed too
    assert torch.isfinite(states).all()


def test_unsupported_family_falls_back_to_the_whole_model_and_says_so(tiny_models, monkeypatch, caplog):
    old, new = tiny_models["llama"], tiny_models["qwen2"]
    texts = builtin_calibration_texts()[:20]
    streamed = paired_activations(old, new, texts, max_tokens=300, max_tokens_per_text=48, progress=False)
    monkeypatch.setattr(activations, "STREAMED_MODEL_TYPES", ("qwen2",))
    with caplog.at_level(logging.INFO, logger="lorasuite_core.transfer.activations"):
        mixed = paired_activations(old, new, texts, max_tokens=300, max_tokens_per_text=48, progress=False)
    fallback = [r.getMessage() for r in caplog.records if "not streamed" in r.getMessage()]
    assert len(fallback) == 1 and old.source in fallback[0] and "'llama'" in fallback[0]
    assert streamed.num_texts == mixed.num_texts and streamed.num_tokens == mixed.num_tokens == 300
    assert abs(streamed.old_states - mixed.old_states).max() <= 1e-5
    assert abs(streamed.new_states - mixed.new_states).max() <= 1e-5


def test_checkpoint_missing_a_tensor_outside_the_layers_is_not_streamed(tiny_models, monkeypatch):
    base = tiny_models["llama"]
    batches, positions = _batches(base, texts=8)
    monkeypatch.delitem(base.weights.shard_of, "model.norm.weight")
    with pytest.raises(activations.StreamUnsupported, match="model.norm.weight"):
        streamed_states(base, batches, positions)


def test_a_body_without_an_input_embedding_is_not_streamed(tiny_models, monkeypatch):
    """The streamed forward feeds renumbered ids, so it must hold exactly the texts' embedding rows or not stream."""
    from transformers import LlamaModel

    base = tiny_models["llama"]
    batches, positions = _batches(base, texts=8)

    def missing(self):
        raise NotImplementedError("no embedding here")

    monkeypatch.setattr(LlamaModel, "get_input_embeddings", missing)
    with pytest.raises(activations.StreamUnsupported, match="no input embedding module"):
        streamed_states(base, batches, positions)
    fallback = activations.model_states(base, batches, positions)          # the whole model, ids as they are
    monkeypatch.undo()
    assert (fallback - streamed_states(base, batches, positions)).abs().max().item() <= 1e-5
