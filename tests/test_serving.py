"""Serving-ready outputs (issue 19): the vLLM / LoRAX / TGI check accepts and rejects known cases, and
``--serving vllm`` exports exactly (a rank-12 adapter padded to 16 gives PEFT's logits).
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.serving import check_serving, export_plain_lora, vllm_rank
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 11]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("serving") / "model", seed=7)


def logits(model_dir, adapter_dir) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(IDS).logits


def peft_adapter(model_dir, out, config, seed=0):
    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def test_vllm_ranks():
    assert [vllm_rank(r) for r in (1, 4, 8, 12, 16, 300, 320, 321, 512, 513)] == [1, 8, 8, 16, 16, 320, 320, 512, 512, None]


def test_check_accepts_plain_lora_and_rejects_known_cases(model, tmp_path):
    plain = make_random_lora_adapter(model, tmp_path / "plain", rank=12, alpha=24, seed=1)
    verdict = check_serving(plain)
    assert all(v["servable"] and not v["problems"] for v in verdict.values()), verdict
    assert verdict["vllm"]["rank"] == 12 and verdict["vllm"]["max_lora_rank"] == 16

    cases = {}
    dora = peft_adapter(model, tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    cases["DoRA"] = dora
    saved = peft_adapter(model, tmp_path / "saved", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    cases["modules_to_save"] = saved
    ada = peft_adapter(model, tmp_path / "ada", AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj"], total_step=10))
    cases["AdaLoRA"] = ada
    pattern = shutil.copytree(plain, tmp_path / "pattern")
    config = json.loads((pattern / "adapter_config.json").read_text())
    first = sorted(load_file(pattern / "adapter_model.safetensors"))[0].split(".lora_")[0].removeprefix("base_model.model.")
    (pattern / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {first.replace(".", r"\."): 99}}))
    cases["another scaling"] = pattern
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 600, "lora_alpha": 600,
                                                         "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(600, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 600)},
              big / "adapter_model.safetensors")
    for needle, directory in cases.items():
        verdict = check_serving(directory)
        assert not verdict["vllm"]["servable"], needle
        assert any(needle in p for p in verdict["vllm"]["problems"]), (needle, verdict["vllm"]["problems"])
    assert any("non-LoRA weight" in p for p in check_serving(saved)["lorax"]["problems"])
    big_verdict = check_serving(big)
    assert big_verdict["vllm"]["max_lora_rank"] is None and big_verdict["lorax"]["servable"]
    assert "above vLLM's largest max_lora_rank 512" in big_verdict["vllm"]["problems"][0]


def test_rank_12_padded_to_16_gives_identical_logits(model, tmp_path, caplog):
    adapter = make_random_lora_adapter(model, tmp_path / "r12", rank=12, alpha=24, seed=3)
    reference = logits(model, adapter)
    facts = export_plain_lora(adapter, tmp_path / "vllm")
    assert facts["rank"] == 16 and facts["padded_from"] == [12] and facts["rescaled_modules"] == 0
    exported = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in exported.items() if "lora_A" in k} == {16}
    assert all(t[:, 12:].eq(0).all() for k, t in exported.items() if "lora_B" in k)
    assert torch.equal(logits(model, tmp_path / "vllm"), reference)
    assert check_serving(tmp_path / "vllm")["vllm"] == {"servable": True, "problems": [], "rank": 16, "max_lora_rank": 16}

    # a module with its own alpha (alpha_pattern) and a saved non-LoRA weight: folded / left out, same logits
    patterned = shutil.copytree(adapter, tmp_path / "patterned")
    config = json.loads((patterned / "adapter_config.json").read_text())
    tensors = load_file(patterned / "adapter_model.safetensors")
    module = sorted(tensors)[0].split(".lora_")[0].removeprefix("base_model.model.")
    (patterned / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {module.replace(".", r"\."): 6}}))
    reference = logits(model, patterned)
    tensors["base_model.model.model.norm.weight"] = torch.ones(8)
    save_file(tensors, patterned / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING):
        facts = export_plain_lora(patterned, tmp_path / "vllm2")
    assert facts["rescaled_modules"] == 1 and facts["left_out"] == ["base_model.model.model.norm.weight"]
    assert sum("leaving out 1 non-LoRA weight" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(logits(model, tmp_path / "vllm2"), reference, rtol=1e-5, atol=1e-6)
    assert check_serving(tmp_path / "vllm2")["vllm"]["servable"]


def test_adalora_folds_into_plain_lora_and_dora_is_refused(model, tmp_path):
    ada = peft_adapter(model, tmp_path / "ada", AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj", "v_proj"],
                                                              total_step=10, lora_alpha=12))
    reference = logits(model, ada)
    facts = export_plain_lora(ada, tmp_path / "vllm")
    assert facts["source_variant"] == "adalora" and facts["rank"] == 8
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "init_r" not in config
    # E folded into A in float32: equal up to rounding, far below what the adapter changes
    torch.testing.assert_close(logits(model, tmp_path / "vllm"), reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        bare = AutoModelForCausalLM.from_pretrained(model)(IDS).logits
    assert (reference - bare).abs().max() > 1e-2
    assert all(v["servable"] for v in check_serving(tmp_path / "vllm").values())

    dora = peft_adapter(model, tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorasuiteError, match="vLLM cannot serve DoRA.*vllm-lora"):
        export_plain_lora(dora, tmp_path / "no")


def test_migrate_records_serving_and_exports_for_vllm(tmp_path, capsys, prefect_server):
    from flows.cli import main
    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    old = make_tiny_model_dir("llama", tmp_path / "old", seed=11)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(permute_heads=True))
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=12, alpha=24, seed=12)

    def migrate(out, *extra):
        return main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                     "--output", str(out), "--no-lft", "--max-calibration-tokens", "128", "--cache-root",
                     str(tmp_path / "cache"), *extra])

    assert migrate(tmp_path / "peft") == 0
    report = json.loads((tmp_path / "peft" / "migration_report.json").read_text())
    assert set(report["serving"]) == {"vllm", "lorax", "tgi"} and "serving_export" not in report
    assert migrate(tmp_path / "vllm", "--serving", "vllm") == 0
    report = json.loads((tmp_path / "vllm" / "migration_report.json").read_text())
    assert report["serving_export"]["rank"] == 16 and report["serving"]["vllm"]["servable"], report["serving"]
    torch.testing.assert_close(logits(new, tmp_path / "vllm"), logits(new, tmp_path / "peft"), rtol=1e-5, atol=1e-5)

    dora = peft_adapter(old, tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    adapter = dora
    capsys.readouterr()
    assert migrate(tmp_path / "dora-out", "--serving", "vllm") == 2
    assert "DoRA, which vLLM cannot serve" in capsys.readouterr().err
    assert not (tmp_path / "dora-out").exists()
    assert migrate(tmp_path / "dora-lora", "--serving", "vllm-lora") == 0
    report = json.loads((tmp_path / "dora-lora" / "migration_report.json").read_text())
    assert report["serving_export"]["source_variant"] == "dora" and "max" in report["serving_export"]["dora_residual"]
    assert report["serving"]["vllm"]["servable"], report["serving"]


def test_dora_is_approximated_by_plain_lora_with_its_residual(model, tmp_path):
    from safetensors import safe_open

    dora = peft_adapter(model, tmp_path / "dora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             use_dora=True))
    random_magnitude = shutil.copytree(dora, tmp_path / "dora-random")
    tensors = load_file(dora / "adapter_model.safetensors")
    with safe_open(model / "model.safetensors", framework="pt") as base:
        for key in [k for k in tensors if k.endswith("lora_magnitude_vector")]:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
            W = base.get_tensor(f"{module}.weight").double()
            A = tensors[f"base_model.model.{module}.lora_A.weight"].double()
            B = tensors[f"base_model.model.{module}.lora_B.weight"].double()
            tensors[key] = (W + 2.0 * B @ A).norm(dim=1).float()      # c = m / ||W + sBA|| = 1: ΔW = s B A
    save_file(tensors, dora / "adapter_model.safetensors")

    facts = export_plain_lora(dora, tmp_path / "exact", dora_base_model=model)
    assert facts["source_variant"] == "dora" and facts["rank"] == 8 and facts["dora_residual"]["max"] < 1e-5
    torch.testing.assert_close(logits(model, tmp_path / "exact"), logits(model, dora), rtol=1e-4, atol=1e-5)
    assert all(v["servable"] for v in check_serving(tmp_path / "exact").values())

    facts = export_plain_lora(random_magnitude, tmp_path / "approx", dora_base_model=model)
    residuals = facts["dora_residual"]["modules"]
    assert facts["dora_residual"]["max"] == max(residuals.values()) > 1e-2
    # the reported residual is the one of the factors written: recompute one module's
    module = sorted(residuals)[0]
    written = load_file(tmp_path / "approx" / "adapter_model.safetensors")
    source = load_file(random_magnitude / "adapter_model.safetensors")
    with safe_open(model / "model.safetensors", framework="pt") as base:
        W = base.get_tensor(f"{module}.weight").double()
    A = source[f"base_model.model.{module}.lora_A.weight"].double()
    B = source[f"base_model.model.{module}.lora_B.weight"].double()
    m = source[f"base_model.model.{module}.lora_magnitude_vector"].double()
    adapted = W + 2.0 * B @ A
    delta = (m / adapted.norm(dim=1)).unsqueeze(1) * adapted - W
    approx = written[f"base_model.model.{module}.lora_B.weight"].double() @ written[f"base_model.model.{module}.lora_A.weight"].double()
    assert abs(float((delta - approx).norm() / delta.norm()) - residuals[module]) < 1e-5
