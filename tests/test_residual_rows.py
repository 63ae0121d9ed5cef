"""The transfer matrix fits on gathered embedding rows: the same inputs and maps as the full table."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorasuite_core.models.loading import load_base_model
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.transfer.residual import residual_transfer
from lorasuite_core.transfer.vocab import shared_vocabulary


@pytest.mark.parametrize("family", ["llama", "bloom", "gemma3"])
def test_gathered_rows_equal_the_full_effective_embeddings(family, tmp_path):
    model = load_base_model(make_tiny_model_dir(family, tmp_path / family, seed=2))
    ids = np.array([7, 3, 3, 40, 0, 11], dtype=np.int64)          # unordered, repeated
    rows = model.effective_embeddings(ids)
    assert rows.dtype == torch.float64 and rows.shape == (6, model.dims.hidden)
    assert torch.equal(rows, model.effective_embeddings()[torch.as_tensor(ids)])


def test_rows_are_read_a_window_at_a_time(tmp_path, monkeypatch):
    from lorasuite_core.models import loading

    model = load_base_model(make_tiny_model_dir("llama", tmp_path / "m", seed=2))
    name = model.family.embedding
    table = model.weights.get(name)
    ids = torch.tensor([250, 7, 3, 3, 40, 0, 11, 251, 120, 7], dtype=torch.long)
    read = []
    real = loading._gather_rows

    def spy(sliced, rows):
        class Window:                 # records each slice's row count
            def __getitem__(self, key):
                read.append(key.stop - key.start if isinstance(key, slice) else 0)
                return sliced[key]
        return real(Window(), rows)

    monkeypatch.setattr(loading, "ROW_WINDOW", 16)
    monkeypatch.setattr(loading, "_gather_rows", spy)
    assert torch.equal(model.weights.get(name, ids), table[ids])
    assert read and max(read) <= 16 and sum(read) < 60          # windows 0-15, 40, 120, 250-251: not rows 0-251


def test_fit_on_gathered_rows_recovers_a_rotated_widened_stream(tmp_path):
    old_dir = make_tiny_model_dir("llama", tmp_path / "old", seed=3)
    new_dir = upgrade_model_dir(old_dir, tmp_path / "new", UpgradeSpec(widen_residual=8, rotate_residual=True, seed=1))
    old, new = load_base_model(old_dir), load_base_model(new_dir)
    rt = residual_transfer(old, new, shared_vocabulary(old.tokenizer(), new.tokenizer()))
    assert rt.P.shape == (64, 72) and rt.Q.shape == (72, 64)
    assert rt.fit_residual_old < 1e-6 and rt.fit_residual_new < 1e-6
    assert torch.allclose(rt.P @ rt.Q, torch.eye(64, dtype=torch.float64), atol=1e-6)   # Q = c·R, P = Rᵀ/c


def test_fit_reads_rows_a_chunk_at_a_time_and_chunking_does_not_change_the_maps(tmp_path, monkeypatch):
    from lorasuite_core.transfer import residual

    old_dir = make_tiny_model_dir("llama", tmp_path / "old", seed=3)
    new_dir = upgrade_model_dir(old_dir, tmp_path / "new", UpgradeSpec(widen_residual=8, seed=1))
    old, new = load_base_model(old_dir), load_base_model(new_dir)
    shared = shared_vocabulary(old.tokenizer(), new.tokenizer())
    whole = residual_transfer(old, new, shared)                     # FIT_CHUNK ≥ the tiny vocabulary
    assert len(shared) <= residual.FIT_CHUNK
    read = []
    real = type(old).effective_embeddings

    def counted(self, ids=None):
        read.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(residual, "FIT_CHUNK", 37)
    monkeypatch.setattr(type(old), "effective_embeddings", counted)
    chunked = residual_transfer(old, new, shared)
    assert max(read) == 37 and sum(read) == 4 * len(shared)          # two passes, both models
    assert torch.allclose(chunked.P, whole.P, atol=1e-12) and torch.allclose(chunked.Q, whole.Q, atol=1e-12)
    for field in ("scale", "fit_residual_old", "fit_residual_new"):
        assert getattr(chunked, field) == pytest.approx(getattr(whole, field), rel=1e-9, abs=1e-12)
