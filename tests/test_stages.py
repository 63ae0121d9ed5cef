"""The pipeline's core pieces without Prefect: stage store, layer-result files, keys, manifest additions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorasuite_core.io import completion
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.layer_results import load_layer_result, save_layer_result
from lorasuite_core.pipeline.manifest import FleetManifest, ManifestError
from lorasuite_core.transfer.adapter import MigratedModule, NewLayerResult
from lorasuite_core.transfer.refactor import refactorise
from lorasuite_core.transfer.residual import residual_transfer
from lorasuite_core.pipeline.stage_store import FACTS_FILE, StageStore, stage_key, texts_identity
from lorasuite_core.transfer.vocab import SharedVocabulary


def test_layer_result_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    modules = [MigratedModule(2, name, refactorise(torch.randn(8, 6, generator=g, dtype=torch.float64), 3, 0.7),
                              3, 2.1, [1, 2]) for name in ("down_proj", "q_proj")]
    result = NewLayerResult(modules, {"1->2.q": 1.25e-17}, {"1->2.gate": 0.1 + 0.2}, {"q", "down"})
    loaded = load_layer_result(save_layer_result(result, tmp_path / "layer"))
    assert [(m.layer, m.name, m.rank, m.alpha, m.old_layers) for m in loaded.modules] == \
           [(m.layer, m.name, m.rank, m.alpha, m.old_layers) for m in modules]
    for a, b in zip(loaded.modules, modules):
        assert torch.equal(a.factors.A, b.factors.A) and torch.equal(a.factors.B, b.factors.B)
        assert a.factors.A.dtype == b.factors.A.dtype and a.factors.residual == b.factors.residual
    assert (loaded.unit_fit, loaded.input_offsets, loaded.roles) == (result.unit_fit, result.input_offsets, result.roles)


def test_stage_store_computes_once_then_reuses(tmp_path):
    store, calls = StageStore(str(tmp_path / "store")), []

    def compute(out):
        calls.append(out)
        (out / "data.json").write_text("[1, 2]")
        return {"answer": 42}

    key = stage_key("demo", model="m1")
    first, second = store.run("demo", key, compute), store.run("demo", key, compute)
    assert (first.reused, second.reused, len(calls)) == (False, True, 1)
    assert first.facts == second.facts == {"answer": 42}
    assert completion.is_complete(first.uri) and (store.local_dir(first.uri) / "data.json").is_file()
    assert json.loads((store.local_dir(first.uri) / FACTS_FILE).read_text()) == {"answer": 42}
    assert stage_key("demo", model="m2") != key and stage_key("other", model="m1") != key


def test_incomplete_entry_is_recomputed_and_never_read(tmp_path):
    store = StageStore(str(tmp_path / "store"))
    key = stage_key("demo", model="m")
    partial = tmp_path / "store" / "demo" / key
    partial.mkdir(parents=True)
    (partial / FACTS_FILE).write_text('{"answer": "stale"}')   # no completion manifest: a crashed writer
    with pytest.raises(LorasuiteError, match="corrupt or incomplete"):
        store.local_dir(str(partial))
    assert store.run("demo", key, lambda out: {"answer": 1}).facts == {"answer": 1}


def test_keys_depend_on_text_content_and_order():
    assert texts_identity(["a", "b"]) != texts_identity(["b", "a"])
    assert texts_identity(["a"]) == texts_identity(["a"])


def test_transfer_matrices_are_contiguous_like_reloaded_ones():
    g = torch.Generator().manual_seed(1)
    E_o, E_n = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)

    class Toy:
        def __init__(self, E):
            self.E, self.dims = E, type("D", (), {"hidden": E.shape[1]})

        def effective_embeddings(self, ids=None):
            return self.E if ids is None else self.E[torch.as_tensor(ids)]

    ids = np.arange(12, dtype=np.int64)
    rt = residual_transfer(Toy(E_o), Toy(E_n), SharedVocabulary(ids, ids))
    # a reloaded analysis holds contiguous arrays; computing in the same layout keeps reruns bit-identical
    assert rt.P.is_contiguous() and rt.Q.is_contiguous()
    assert rt.P.shape == (3, 5) and rt.Q.shape == (5, 3)


def test_manifest_analysis_section_and_entry_knobs():
    base = {"old_model": "/m/old", "new_model": "/m/new", "output_root": "/out",
            "adapters": [{"name": "a", "adapter": "/a", "lft_data": "/d.jsonl", "overrides": {"eval_samples": 5}}]}
    fleet = FleetManifest.from_dict(base)
    assert fleet.analysis.max_calibration_tokens == 2048 and fleet.analysis.calibration_data is None
    assert fleet.effective_options(fleet.adapters[0]).eval_samples == 5
    bad = dict(base, analysis={"max_calibration_tokens": 2, "calibration_tokens": 9})
    with pytest.raises(ManifestError) as info:
        FleetManifest.from_dict(bad, source="fleet.yaml")
    assert [path for path, _ in info.value.errors] == ["analysis.max_calibration_tokens", "analysis.calibration_tokens"]
