"""Zero-initialised extra modules on new layers no old layer maps to (issue 10 item 3).

The upgrade inserts identity layers 0 and 3, which no old layer maps onto; with
``combine_layers(..., zero_init_unmapped=True)`` they get the adapter's target modules, A drawn
like PEFT's fresh init from a seeded generator and a zero delta (B = 0; AdaLoRA E = 0; DoRA
magnitude ‖W‖_row). The migrated logits must not change before the first step, the modules must
load in PEFT and be trainable (one step moves them), and the draw must be deterministic.
The migration here runs the library's per-layer functions with the generator's ground-truth
layer mapping (no calibration), the same functions the pipeline stages call.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorasuite_core.models.loading import load_base_model, load_lora_adapter
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.testing.verification import load_model, logits_over_shared_vocab, relative_max_error, sequence_logits
from lorasuite_core.models.writing import adapter_config, adapter_tensors, write_adapter_dir
from lorasuite_core.transfer.adapter import (PairAnalysis, combine_layers, match_layer_pair, sources_by_new_layer,
                                             transfer_new_layer)
from lorasuite_core.transfer.residual import residual_transfer
from lorasuite_core.transfer.vocab import shared_vocabulary
from tests.test_adalora_dora import make_adalora_adapter, make_dora_adapter

IDS = [[5, 17, 42, 99, 120, 7, 64, 33], [3, 8, 13, 21, 34, 55, 89, 144]]
ADAPTERS = {
    "lora": lambda model, out: make_random_lora_adapter(model, out, rank=4, alpha=8, seed=1),
    "dora": lambda model, out: make_dora_adapter(model, out, seed=1),
    "adalora": lambda model, out: make_adalora_adapter(model, out, seed=1),
}


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-init")
    old = make_tiny_model_dir("llama", root / "old", seed=41)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(identity_layers=(0, 3), permute_heads=True, seed=2))
    return root, old, new


def layer_results(old_dir, new_dir, adapter_dir):
    old, new = load_base_model(old_dir), load_base_model(new_dir)
    adapter = load_lora_adapter(adapter_dir, old.family)
    truth = json.loads((new_dir / "lorasuite_upgrade.json").read_text())["layer_map"]
    mapping = sorted((int(i), int(j)) for i, j in truth.items())
    shared = shared_vocabulary(old.tokenizer(), new.tokenizer())
    analysis = PairAnalysis(shared, residual_transfer(old, new, shared), np.zeros((0, 0)), np.zeros((0, 0)), mapping)
    for i, j in mapping:
        analysis.matches[i] = match_layer_pair(old, new, analysis.residual, i, j)
    sources = sources_by_new_layer(mapping, {layer for layer, _ in adapter.factors})
    results = [transfer_new_layer(old, new, analysis, adapter, j, sources[j], "lstsq") for j in sorted(sources)]
    return new, adapter, results


def write(new, adapter, results, out, **options):
    migrated = combine_layers(new, results, **options)
    config = adapter_config(adapter.config, new, migrated)
    write_adapter_dir(out, config, adapter_tensors(new, migrated), {"zero_initialised_layers": migrated.zero_init_layers},
                      overwrite=True)
    return migrated


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_zero_init_modules_leave_the_migrated_logits_unchanged(variant, upgrade):
    root, old_dir, new_dir = upgrade
    adapter_dir = ADAPTERS[variant](old_dir, root / f"adapter-{variant}")
    new, adapter, results = layer_results(old_dir, new_dir, adapter_dir)
    plain, extra = root / f"plain-{variant}", root / f"extra-{variant}"
    assert write(new, adapter, results, plain).zero_init_layers == []
    migrated = write(new, adapter, results, extra, zero_init_unmapped=True, seed=7)
    assert migrated.zero_init_layers == [0, 3]
    config = json.loads((extra / "adapter_config.json").read_text())
    assert config["layers_to_transform"] is None
    targets = sorted(adapter.target_names)
    (zero_rank,) = {m.rank for m in migrated.modules if not m.old_layers}

    loaded = load_model(new_dir, extra)
    for j in (0, 3):
        for name in targets:
            if variant == "dora" and name in ("o_proj", "down_proj"):
                # identity layers write nothing: all-zero o/down rows, which PEFT's DoRA cannot normalise
                assert not any(m.layer == j and m.name == name for m in migrated.modules)
                path = f"base_model.model.model.layers.{j}.{new.family.modules[name].path}"
                assert not hasattr(loaded.get_submodule(path), "lora_A"), "exclude_modules keeps PEFT off it"
                continue
            module = loaded.get_submodule(f"base_model.model.model.layers.{j}.{new.family.modules[name].path}")
            if variant == "adalora":
                assert module.lora_A["default"].shape[0] == zero_rank and float(module.ranknum["default"]) == 6
                assert torch.count_nonzero(module.lora_E["default"]) == 0
                assert 0.01 < float(module.lora_A["default"].std()) < 0.03
            else:
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                assert A.shape[0] == adapter.config["r"] and torch.count_nonzero(B) == 0
                bound = A.shape[1] ** -0.5
                assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.8 * bound
    # before the first step: the same logits as without the extra modules, and still the old adapter's
    extra_logits = sequence_logits(loaded, IDS)
    plain_logits = sequence_logits(load_model(new_dir, plain), IDS)
    if variant == "dora":        # W' = W · m / ‖W‖_row with m = ‖W‖_row rounded to float32
        assert relative_max_error(plain_logits, extra_logits) < 1e-6
    else:                        # B = 0 (E = 0): the extra delta is exactly zero
        assert torch.equal(plain_logits, extra_logits)
    ref, got = logits_over_shared_vocab(old_dir, new_dir, IDS, old_adapter=adapter_dir, new_adapter=extra)
    assert relative_max_error(ref, got) <= 1e-4


def test_zero_init_is_seeded_and_trains(upgrade):
    root, old_dir, new_dir = upgrade
    adapter_dir = ADAPTERS["lora"](old_dir, root / "adapter-seeded")
    new, adapter, results = layer_results(old_dir, new_dir, adapter_dir)
    write(new, adapter, results, root / "a", zero_init_unmapped=True, seed=3)
    write(new, adapter, results, root / "b", zero_init_unmapped=True, seed=3)
    write(new, adapter, results, root / "c", zero_init_unmapped=True, seed=4)
    a, b, c = (load_file(root / d / "adapter_model.safetensors") for d in "abc")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a[key], c[key])

    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new_dir), root / "a", is_trainable=True)
    B = model.get_submodule("base_model.model.model.layers.3.mlp.down_proj").lora_B["default"].weight
    assert B.requires_grad and torch.count_nonzero(B) == 0
    ids = torch.tensor(IDS)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.count_nonzero(B) > 0, "the zero-initialised module must receive gradient"
