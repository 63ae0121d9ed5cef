"""Length-sorted calibration batches: fewer padded rows, the same states in text order."""
from __future__ import annotations

import pytest
import torch

from lorasuite_core.models.loading import load_base_model
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.transfer.activations import (_paired_texts, builtin_calibration_texts, length_batches,
                                                 paired_activations, whole_model_states)


def test_length_batches_sort_and_respect_both_limits():
    lengths = [5, 30, 7, 6, 30, 2, 9]
    batches = length_batches(lengths, batch_size=3, batch_tokens=40)
    assert sorted(t for b in batches for t in b) == list(range(7))
    flat = [lengths[t] for b in batches for t in b]
    assert flat == sorted(lengths)
    assert all(len(b) <= 3 and len(b) * max(lengths[t] for t in b) <= 40 for b in batches)
    assert batches == [[5, 0, 3], [2, 6], [1], [4]]
    assert length_batches([50], batch_size=8, batch_tokens=10) == [[0]]    # longer than the budget: alone


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    return (load_base_model(make_tiny_model_dir("llama", root / "old", seed=1)),
            load_base_model(make_tiny_model_dir("qwen2", root / "new", seed=2)))


def test_sorted_batches_give_the_states_of_one_text_at_a_time(pair):
    old, new = pair
    texts = builtin_calibration_texts()[:24]
    acts = paired_activations(old, new, texts, max_tokens=10_000, max_tokens_per_text=48, batch_size=5,
                              batch_tokens=120, progress=False)
    pairs, total = _paired_texts(old.tokenizer(), new.tokenizer(), texts, 10_000, 48)
    assert acts.num_tokens == total and acts.num_texts == len(pairs)
    for side, model, ids, pos in (("old", old, 0, 1), ("new", new, 2, 3)):
        one_by_one = whole_model_states(model, [[p[ids]] for p in pairs], [p[pos] for p in pairs])   # file order
        got = torch.from_numpy(getattr(acts, f"{side}_states"))
        assert got.shape == one_by_one.shape
        assert (got - one_by_one).abs().max() <= 1e-5
