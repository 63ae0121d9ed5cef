"""The ablation switches of the options schema: layer mapping and head mapping (issue 13, item 1)."""
from __future__ import annotations

import json

import pytest
import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline import pair_stages
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.pipeline.stages import migrate_in_process
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.transfer.layer_mapping import fixed_mapping
from tests.exactness import logits_over_shared_vocab, relative_max_error


@pytest.mark.parametrize("old, new, method, expected", [
    (4, 6, "sequential", [0, 2, 3, 5]),         # round(i * 5/3): ends on ends, evenly spread
    (4, 6, "first", [0, 1, 2, 3]),
    (4, 6, "last", [2, 3, 4, 5]),
    (6, 4, "sequential", [0, 1, 1, 2, 2, 3]),   # shrinking: neighbours share a layer
    (6, 4, "first", [0, 1, 2, 3, 3, 3]),        # the overflow shares the end layer
    (6, 4, "last", [0, 0, 0, 1, 2, 3]),
    (1, 3, "sequential", [0]),
])
def test_fixed_layer_mappings(old, new, method, expected):
    assert fixed_mapping(old, new, method) == list(enumerate(expected))


def test_an_unknown_layer_mapping_is_refused():
    with pytest.raises(LorasuiteError, match="layer mapping must be one of cka, sequential, first, last"):
        fixed_mapping(3, 4, "medium")


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    """Heads permuted and one identity layer inserted at the front: the CKA mapping is not sequential."""
    root = tmp_path_factory.mktemp("mapping")
    old = make_tiny_model_dir("llama", root / "old", seed=3)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, identity_layers=(0,), seed=4))
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=5)
    return root, old, new, adapter


def _migrate(permuted, name: str, analysis: AnalysisOptions) -> tuple[dict, float]:
    root, old, new, adapter = permuted
    out = root / name
    report = migrate_in_process(old, new, adapter, out, analysis=analysis, cache_root=str(root / "store"))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()
    reference, migrated = logits_over_shared_vocab(old, new, ids, old_adapter=adapter, new_adapter=out)
    return report, relative_max_error(reference, migrated)


def test_head_and_layer_mapping_switches_change_the_migration_and_are_reported(permuted):
    pair_stages.clear_memo()
    exact, error = _migrate(permuted, "default", AnalysisOptions(max_calibration_tokens=128))
    assert error < 1e-4
    assert exact["options"]["layer_mapping"] == "cka" and exact["options"]["head_mapping"] == "hungarian"
    assert exact["head_mapping_used"] == "hungarian"
    assert [tuple(p) for p in exact["layer_mapping"]] == [(0, 1), (1, 2), (2, 3)]        # the inserted layer skipped

    identity, error = _migrate(permuted, "identity", AnalysisOptions(max_calibration_tokens=128,
                                                                     head_mapping="identity"))
    assert identity["options"]["head_mapping"] == "identity"
    heads = [p for layer in identity["head_mapping"].values() for p in layer["query_heads"]]
    assert all(i == j for i, j in heads)
    assert error > 1e-2                              # the permutation is not undone: the transfer is no longer exact

    first, _ = _migrate(permuted, "first", AnalysisOptions(max_calibration_tokens=128, layer_mapping="first"))
    assert first["options"]["layer_mapping"] == "first"
    assert [tuple(p) for p in first["layer_mapping"]] == [(0, 0), (1, 1), (2, 2)]
    keys = {json.dumps(r["pipeline"]["keys"], sort_keys=True) for r in (exact, identity, first)}
    assert len(keys) == 3                            # each choice has its own stage entries


def test_bf16_calibration_forward_keeps_the_cka_layer_mapping(permuted):
    """The activations stage multiplies in bf16 where it feeds only CKA (plans.activations_dtype): the states
    move by bf16 rounding, the CKA by far less than the gap the layer mapping decides on, so the mapping
    (an identity layer inserted at the front) is the float32 one."""
    from lorasuite_core.models.loading import load_base_model
    from lorasuite_core.transfer.activations import PairedActivations, builtin_calibration_texts, paired_activations
    from lorasuite_core.transfer.cka import minibatch_cka
    from lorasuite_core.transfer.layer_mapping import map_layers

    _, old, new = permuted[:3]
    old_model, new_model = load_base_model(str(old)), load_base_model(str(new))
    runs = {dtype: paired_activations(old_model, new_model, builtin_calibration_texts(), max_tokens=256,
                                      progress=False, compute_dtype=dtype) for dtype in (None, torch.bfloat16)}
    exact, rounded = runs[None], runs[torch.bfloat16]
    assert 0 < abs(rounded.new_states - exact.new_states).max() < 0.05 * abs(exact.new_states).max()
    ckas = [minibatch_cka(PairedActivations.updates(r.old_states), PairedActivations.updates(r.new_states))
            for r in (exact, rounded)]
    assert abs(ckas[0] - ckas[1]).max() < 0.02
    assert map_layers(ckas[1], None) == map_layers(ckas[0], None) == [(0, 1), (1, 2), (2, 3)]


def test_activations_dtype_is_float32_where_the_transfer_is_fitted_on_them(monkeypatch):
    from lorasuite_core.pipeline import plans
    from lorasuite_core.training import devices

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert plans.activations_dtype(AnalysisOptions()) == "bfloat16"
    assert plans.activations_dtype(AnalysisOptions(transfer_fit="activations")) == "float32"
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert plans.activations_dtype(AnalysisOptions()) == "float32"
