"""Adapter and attention variants beyond the per-family exactness grid.

- rank_pattern / alpha_pattern: per-module ranks and alphas survive the migration (with the
  layer indices rewritten to the new layers) and the transfer stays exact;
- multi-query attention (one kv head) upgraded to grouped-query attention;
- the paper's transform is selectable and measurably not exact;
- cross-family migrations (fused QKV <-> separate projections, gated <-> plain MLP) give a
  PEFT adapter that loads and runs on the new model.
"""
from __future__ import annotations

import json

import pytest

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from flows.cli import main
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from tests.exactness import logits_over_shared_vocab, relative_max_error

pytestmark = pytest.mark.usefixtures("prefect_server")

COMBINED = UpgradeSpec(fold_norms=True, rotate_residual=True, widen_residual=8, permute_heads=True,
                       kv_replication=2, permute_neurons=True, extra_neurons=8, identity_layers=(2,),
                       extra_vocab=10, renumber_vocab=True, seed=11)


def migrate(old, new, adapter, out, *extra):
    return main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--no-fidelity", "--max-calibration-tokens", "512", *extra])


def patterned_adapter(model_dir, out_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"o_proj": 3})
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_rank_and_alpha_patterns_survive(tmp_path):
    old = make_tiny_model_dir("llama", tmp_path / "old", seed=21)
    adapter = patterned_adapter(old, tmp_path / "adapter")
    new = upgrade_model_dir(old, tmp_path / "new", COMBINED)
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out) == 0
    ids = [[5, 17, 42, 99, 120, 7, 64, 33]]
    ref, got = logits_over_shared_vocab(old, new, ids, old_adapter=adapter, new_adapter=out)
    assert relative_max_error(ref, got) <= 1e-4
    config = json.loads((out / "adapter_config.json").read_text())
    layer_map = {int(k): v for k, v in json.loads((new / "lorasuite_upgrade.json").read_text())["layer_map"].items()}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new), out)
    ranks = {name: m.lora_A["default"].weight.shape[0] for name, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    for j in layer_map.values():
        assert ranks[f"base_model.model.model.layers.{j}.self_attn.q_proj"] == 2
        assert ranks[f"base_model.model.model.layers.{j}.self_attn.k_proj"] == 4
    assert ranks[f"base_model.model.model.layers.{layer_map[1]}.mlp.down_proj"] == 6
    assert ranks[f"base_model.model.model.layers.{layer_map[0]}.mlp.down_proj"] == 4
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["alpha_pattern"].values()) == {3}


def test_multi_query_to_grouped_query(tmp_path):
    old = make_tiny_model_dir("llama", tmp_path / "old", seed=22, num_key_value_heads=1)
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=4, alpha=8, seed=3)
    new = upgrade_model_dir(old, tmp_path / "new", COMBINED)
    assert json.loads((new / "config.json").read_text())["num_key_value_heads"] == 2
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out) == 0
    ref, got = logits_over_shared_vocab(old, new, [[3, 8, 13, 21, 34, 55, 89, 144]], old_adapter=adapter, new_adapter=out)
    assert relative_max_error(ref, got) <= 1e-4


def test_paper_transform_is_selectable_and_not_exact(tmp_path):
    old = make_tiny_model_dir("llama", tmp_path / "old", seed=23)
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=4, alpha=8, seed=4)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(fold_norms=True, rotate_residual=True, seed=2))
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out, "--head-transform", "paper") == 0
    report = json.loads((out / "migration_report.json").read_text())
    assert report["options"]["head_transform"] == "paper"
    ref, got = logits_over_shared_vocab(old, new, [[3, 8, 13, 21, 34, 55, 89, 144]], old_adapter=adapter, new_adapter=out)
    assert relative_max_error(ref, got) > 1e-2


def _runs_in_peft(model_dir, adapter_dir):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    return bool(torch.isfinite(logits).all())


def test_cross_family_fused_and_separate(tmp_path):
    llama = make_tiny_model_dir("llama", tmp_path / "llama", seed=24)
    neox = make_tiny_model_dir("gpt_neox", tmp_path / "neox", seed=25)
    llama_adapter = make_random_lora_adapter(llama, tmp_path / "llama-adapter", rank=4, alpha=8, seed=5)
    neox_adapter = make_random_lora_adapter(neox, tmp_path / "neox-adapter", rank=4, alpha=8, seed=6)

    assert migrate(llama, neox, llama_adapter, tmp_path / "to-neox") == 0
    config = json.loads((tmp_path / "to-neox" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    report = json.loads((tmp_path / "to-neox" / "migration_report.json").read_text())
    assert report["dropped_roles"] == ["gate"]
    assert _runs_in_peft(neox, tmp_path / "to-neox")

    assert migrate(neox, llama, neox_adapter, tmp_path / "to-llama") == 0
    config = json.loads((tmp_path / "to-llama" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert _runs_in_peft(llama, tmp_path / "to-llama")
