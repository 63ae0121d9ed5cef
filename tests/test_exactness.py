"""Transfer is exact under function-preserving upgrades, for every family.

For each family a tiny random model with non-trivial norm weights and a LoRA adapter on all
targets (both factors random, so the adapter moves the logits a lot) is upgraded by the
generator in ``lorasuite_core.testing.upgrade`` — each kind of change alone, all combined, and no
change at all — then migrated with ``lorasuite migrate --no-lft``, with the residual maps fitted on the
weights (every case) and on the calibration activations (``--transfer-fit activations``: each family's
all-combined case). The migrated adapter on
the new model must reproduce the old adapter's logits on the old model over the shared
vocabulary (ground-truth token map from the generator) to 1e-4 relative; without the
adapter the same comparison must fail, so the check has teeth. Fidelity (on by default) is off here: it
is scored from the same logits, and tests/test_fidelity.py checks it is 1 under such an upgrade.
"""
from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from tests.exactness import logits_over_shared_vocab, relative_max_error

pytestmark = pytest.mark.usefixtures("prefect_server")

TOLERANCE = 1e-4
CALIBRATION_TOKENS = "768"

COMMON_CHANGES = {
    "identity": UpgradeSpec(),
    "fold_norms": UpgradeSpec(fold_norms=True),
    "rotate": UpgradeSpec(rotate_residual=True),
    "permute_heads": UpgradeSpec(permute_heads=True),
    "permute_neurons": UpgradeSpec(permute_neurons=True),
    "extra_neurons": UpgradeSpec(extra_neurons=24),
    "identity_layers": UpgradeSpec(identity_layers=(0, 3)),
    "vocabulary": UpgradeSpec(extra_vocab=40, renumber_vocab=True),
}
# GPT-NeoX ties head size to hidden_size / num_heads and LayerNorm centres over every
# dimension, so it admits neither widening, extra heads nor kv replication.
WIDENING = {
    "widen": UpgradeSpec(widen_residual=16),
    "kv_replication": UpgradeSpec(kv_replication=2),
    # 6 heads need a hidden size divisible by 6 in transformers' llama/gemma3 configs
    "extra_heads": UpgradeSpec(extra_query_heads_per_group=1, widen_residual=8),
}
# BLOOM's ALiBi slopes depend on each head's index and on the number of heads, and its MLP is
# exactly 4 x hidden wide: heads stay where they are and no neuron is added. Its remaining kinds
# one by one pass too (relative error ~4e-7 each); CI runs the residual permutation alone (the
# embedding LayerNorm's path) and everything combined.
NOT_FOR_ALIBI = ("permute_heads", "extra_neurons")
BLOOM_CASES = ("rotate", "all_combined")
ALL_COMBINED = dict(
    fold_norms=True, rotate_residual=True, permute_heads=True,
    permute_neurons=True, extra_neurons=24, identity_layers=(1, 4), extra_vocab=40, renumber_vocab=True,
)


def cases():
    for family in ("llama", "qwen2", "gemma3", "gpt_neox", "bloom"):
        changes = dict(COMMON_CHANGES)
        combined = dict(ALL_COMBINED, seed=7)
        if family not in ("gpt_neox", "bloom"):
            changes.update(WIDENING)
            combined.update(widen_residual=16, kv_replication=2, extra_query_heads_per_group=1)
        if family == "bloom":
            combined = {k: v for k, v in combined.items() if k not in NOT_FOR_ALIBI}
        changes["all_combined"] = UpgradeSpec(**combined)
        if family == "bloom":
            changes = {k: v for k, v in changes.items() if k in BLOOM_CASES}
        for name, spec in changes.items():
            yield pytest.param(family, spec, id=f"{family}-{name}")


@pytest.fixture(scope="module")
def old_pairs(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            root = tmp_path_factory.mktemp(f"old-{family}")
            model = make_tiny_model_dir(family, root / "model", seed=1)
            adapter = make_random_lora_adapter(model, root / "adapter", rank=4, alpha=8, seed=2)
            built[family] = (model, adapter)
        return built[family]

    return get


def token_batch(old_dir, seed=0):
    vocab = json.loads((old_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 300), (2, 10), generator=g).tolist()


def fit_cases():
    """Every case with the weight-fitted residual maps; with the activation-fitted ones (``--transfer-fit
    activations``, lorasuite_core/transfer/activation_fit.py) every family's all-combined upgrade, which holds
    every kind of change that family admits (each kind alone passes too; CI keeps to the combined ones)."""
    for case in cases():
        yield pytest.param(*case.values, "weights", id=f"{case.id}-weights")
        if case.id.split("-", 1)[1] in ACTIVATION_KINDS:
            yield pytest.param(*case.values, "activations", id=f"{case.id}-activations")


ACTIVATION_KINDS = ("all_combined",)


@pytest.mark.parametrize("family,spec,fit", list(fit_cases()))
def test_migration_is_exact(family, spec, fit, old_pairs, tmp_path):
    old_dir, old_adapter = old_pairs(family)
    new_dir = upgrade_model_dir(old_dir, tmp_path / "new", spec)
    out = tmp_path / "migrated"
    code = main(["-q", "migrate", "--old-model", str(old_dir), "--new-model", str(new_dir), "--adapter", str(old_adapter),
                 "--output", str(out), "--no-lft", "--no-fidelity", "--max-calibration-tokens", CALIBRATION_TOKENS,
                 "--transfer-fit", fit])
    assert code == 0
    ids = token_batch(old_dir)
    reference, migrated = logits_over_shared_vocab(old_dir, new_dir, ids, old_adapter=old_adapter, new_adapter=out)
    assert relative_max_error(reference, migrated) <= TOLERANCE
    _, bare = logits_over_shared_vocab(old_dir, new_dir, ids, old_adapter=old_adapter)
    assert relative_max_error(reference, bare) > 100 * TOLERANCE, "the adapter must matter for the check to mean anything"
    report = json.loads((out / "migration_report.json").read_text())
    truth = json.loads((new_dir / "lorasuite_upgrade.json").read_text())["layer_map"]
    assert report["layer_mapping"] == [[int(i), j] for i, j in sorted(truth.items(), key=lambda kv: int(kv[0]))]
    assert set(report["steps"]) >= {"vocabulary", "transfer_matrix", "activations", "cka", "layer_mapping",
                                    "head_similarity", "transfer"}
    assert all(step["cache"] == "computed" for step in report["steps"].values())
    assert report["transfer_fit"]["fit"] == fit
    if fit == "activations":        # held-out rows predicted to rounding: every fit keeps the smallest ridge
        assert {(k, v) for layer in report["transfer_fit"]["layers"].values() for k, v in layer.items()
                if k.startswith("rho_")} == {(f"rho_{k}", 1e-6) for k in ("attention_input", "mlp_input",
                                                                           "residual_new_from_old")}
