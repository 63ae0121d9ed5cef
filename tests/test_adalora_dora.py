"""AdaLoRA and DoRA adapters migrated (issue 13 item 2).

- AdaLoRA: the delta c·P·diag(E)·Q is carried like a LoRA delta and re-factorised into PEFT's own
  shapes (lora_A r × in, lora_B out × r, lora_E r × 1, ranks pruned by ``rank_pattern`` kept), so
  the migration is exact under every function-preserving upgrade, as for LoRA, and loads in
  stock PEFT with the old rank budget.
- DoRA: the LoRA delta is carried as for LoRA and the magnitude fitted to the carried old
  effective weight (lorasuite_core/transfer/dora.py). Exact where the row normalisation commutes
  with the upgrade (permuted / replicated / added units, residual permutations, identity
  layers, vocabulary changes); under a rotation of the residual stream it is not, and the
  reported residual says by how much.

Every output goes through ``PeftModel.from_pretrained`` (``logits_over_shared_vocab`` loads it).
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from flows.cli import main
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import load_base_model, load_lora_adapter
from lorasuite_core.testing.adapter import DEFAULT_LORA_TARGETS
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.transfer.dora import fit_magnitude
from tests.exactness import logits_over_shared_vocab, relative_max_error

TOLERANCE = 1e-4
IDS = [[5, 17, 42, 99, 120, 7, 64, 33, 2, 11], [3, 8, 13, 21, 34, 55, 89, 144, 1, 4]]


def _peft(model_dir, config):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return get_peft_model(model, config)


def _family(model_dir) -> str:
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    return {"gemma3_text": "gemma3"}.get(model_type, model_type)


def make_dora_adapter(model_dir, out_dir, seed=0, rank=4, alpha=8, spread=0.4):
    """DoRA on every target: random A and B (‖sBA‖ = 0.5 ‖W‖) and a magnitude ‖W + sBA‖_row · U(1 ± spread),
    so the magnitude moves the logits beyond what the LoRA delta does."""
    targets = list(DEFAULT_LORA_TARGETS[_family(model_dir)])
    peft_model = _peft(model_dir, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in sorted(peft_model.named_modules(), key=lambda x: x[0]):
            if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_A:
                continue
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            W = module.get_base_layer().weight
            a = torch.randn(A.shape, generator=g) / math.sqrt(A.shape[1])
            b = torch.randn(B.shape, generator=g)
            delta = (alpha / rank) * b @ a
            b *= 0.5 * W.norm() / delta.norm()
            A.copy_(a)
            B.copy_(b)
            norm = torch.linalg.vector_norm(W + (alpha / rank) * b @ a, dim=1)
            module.lora_magnitude_vector["default"].weight.copy_(norm * (1 - spread + 2 * spread * torch.rand(norm.shape, generator=g)))
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_adalora_adapter(model_dir, out_dir, seed=0, init_r=6):
    """AdaLoRA (init_r 6) on every target with random P, E, Q (‖ΔW‖ = 0.5 ‖W‖) and a rank_pattern
    pruning every module to a random rank in 2..6, saved by PEFT in its pruned shapes."""
    targets = list(DEFAULT_LORA_TARGETS[_family(model_dir)])
    config = AdaLoraConfig(init_r=init_r, target_r=4, lora_alpha=8, total_step=100, tinit=5, tfinal=10,
                           target_modules=targets)
    peft_model = _peft(model_dir, config)
    g = torch.Generator().manual_seed(seed)
    pattern = {}
    with torch.no_grad():
        for name, module in sorted(peft_model.base_model.model.named_modules(), key=lambda x: x[0]):
            if not hasattr(module, "lora_E") or "default" not in module.lora_E:
                continue
            P, E, Q = module.lora_B["default"], module.lora_E["default"], module.lora_A["default"]
            W = module.get_base_layer().weight
            Q.copy_(torch.randn(Q.shape, generator=g) / math.sqrt(Q.shape[1]))
            P.copy_(torch.randn(P.shape, generator=g) / math.sqrt(P.shape[1]))
            E.copy_(0.5 + torch.rand(E.shape, generator=g))
            delta = P @ (E * Q) * 8 / (init_r + 1e-5)
            E *= 0.5 * W.norm() / delta.norm()
            keep = int(torch.randint(2, init_r + 1, (1,), generator=g))
            mask = torch.zeros(init_r, dtype=torch.bool)
            mask[torch.randperm(init_r, generator=g)[:keep]] = True
            pattern[f"{name}.lora_E.default"] = mask.tolist()
    peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.save_pretrained(out_dir)
    return out_dir


def migrate(old, new, adapter, out):
    return main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--no-fidelity", "--max-calibration-tokens", "512"])


EXACT_DORA = {
    "llama-units-layers-vocab": ("llama", UpgradeSpec(fold_norms=True, permute_heads=True, kv_replication=2,
                                                      permute_neurons=True, extra_neurons=8, identity_layers=(1,),
                                                      extra_vocab=10, renumber_vocab=True, seed=3)),
    # gemma3's residual "rotation" is a signed permutation, gpt_neox's a permutation: rows stay rows
    "gemma3-signed-permutation": ("gemma3", UpgradeSpec(rotate_residual=True, permute_heads=True, seed=4)),
    "gpt_neox-fused-permutation": ("gpt_neox", UpgradeSpec(rotate_residual=True, permute_heads=True, permute_neurons=True,
                                                           extra_neurons=8, extra_vocab=10, seed=5)),
}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("case", list(EXACT_DORA))
def test_dora_exact_where_the_normalisation_commutes(case, tmp_path):
    family, spec = EXACT_DORA[case]
    old = make_tiny_model_dir(family, tmp_path / "old", seed=31)
    adapter = make_dora_adapter(old, tmp_path / "adapter", seed=1)
    new = upgrade_model_dir(old, tmp_path / "new", spec)
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out) == 0
    ref, got = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter, new_adapter=out)
    assert relative_max_error(ref, got) <= TOLERANCE
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new), out)
    dora = [n for n, m in loaded.named_modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]
    assert len(dora) == len(load_lora_adapter(out, load_base_model(new).family).factors) > 0
    report = json.loads((out / "migration_report.json").read_text())
    assert report["adapter"]["variant"] == "dora"
    residuals = report["dora_magnitude_residual"]
    assert len(residuals) == len(dora)
    assert max(r["relative_to_weight"] for r in residuals.values()) < 1e-6
    assert max(r["relative_to_change"] for r in residuals.values()) < 1e-5
    if case.startswith("llama"):
        # teeth: the same migrated LoRA delta without the fitted magnitude (plain LoRA) is far off
        plain = tmp_path / "plain"
        plain.mkdir()
        tensors = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "magnitude" not in k}
        save_file(tensors, plain / "adapter_model.safetensors", metadata={"format": "pt"})
        (plain / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=False)))
        _, lora_only = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter, new_adapter=plain)
        assert relative_max_error(ref, lora_only) > 100 * TOLERANCE


@pytest.mark.usefixtures("prefect_server")
def test_dora_under_rotation_reports_the_residual(tmp_path):
    old = make_tiny_model_dir("llama", tmp_path / "old", seed=32)
    adapter = make_dora_adapter(old, tmp_path / "adapter", seed=2)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(fold_norms=True, rotate_residual=True, seed=6))
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out) == 0
    residuals = json.loads((out / "migration_report.json").read_text())["dora_magnitude_residual"]
    facing_in = [r["relative_to_weight"] for k, r in residuals.items() if k.rsplit(".", 1)[-1] in
                 ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    facing_out = [r["relative_to_change"] for k, r in residuals.items() if k.rsplit(".", 1)[-1] in ("o_proj", "down_proj")]
    assert len(facing_in) == 5 * 3 and len(facing_out) == 2 * 3
    assert max(facing_in) < 1e-6            # a rotation on the input side keeps rows rows
    assert min(facing_out) > 1e-2           # Q diag(g) C is no row scaling of Q C
    ref, got = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter, new_adapter=out)
    error = relative_max_error(ref, got)
    _, bare = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter)
    assert TOLERANCE < error < relative_max_error(ref, bare)   # not exact, but far better than no adapter


ADALORA_CASES = {
    "llama-all-combined": ("llama", UpgradeSpec(fold_norms=True, rotate_residual=True, widen_residual=8, permute_heads=True,
                                                kv_replication=2, permute_neurons=True, extra_neurons=8,
                                                identity_layers=(2,), extra_vocab=10, renumber_vocab=True, seed=11)),
    "gpt_neox-fused": ("gpt_neox", UpgradeSpec(rotate_residual=True, permute_heads=True, permute_neurons=True,
                                               extra_neurons=8, identity_layers=(0,), seed=12)),
}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("case", list(ADALORA_CASES))
def test_adalora_is_exact_and_keeps_its_rank_budget(case, tmp_path):
    family, spec = ADALORA_CASES[case]
    old = make_tiny_model_dir(family, tmp_path / "old", seed=33)
    adapter = make_adalora_adapter(old, tmp_path / "adapter", seed=3)
    new = upgrade_model_dir(old, tmp_path / "new", spec)
    out = tmp_path / "out"
    assert migrate(old, new, adapter, out) == 0
    ref, got = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter, new_adapter=out)
    assert relative_max_error(ref, got) <= TOLERANCE
    _, bare = logits_over_shared_vocab(old, new, IDS, old_adapter=adapter)
    assert relative_max_error(ref, bare) > 100 * TOLERANCE

    old_config = json.loads((adapter / "adapter_config.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "lora_alpha"):
        assert config[key] == old_config[key], key
    # pruned ranks follow the layer and unit mapping: module k of old layer i -> module k of new layer j
    layer_map = {int(k): v for k, v in json.loads((new / "lorasuite_upgrade.json").read_text())["layer_map"].items()}
    old_ranks = {k.replace(".lora_E", ""): sum(v) for k, v in old_config["rank_pattern"].items()}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new), out)
    new_ranks = {n.removeprefix("base_model.model."): (m.lora_A["default"].shape[0], float(m.ranknum["default"]))
                 for n, m in loaded.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E}
    for key, rank in old_ranks.items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        new_key = key.replace(f".layers.{layer}.", f".layers.{layer_map[layer]}.")
        assert new_ranks[new_key] == (rank, 6.0), new_key
    tensors = load_file(out / "adapter_model.safetensors")
    for key, rank in old_ranks.items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        prefix = "base_model.model." + key.replace(f".layers.{layer}.", f".layers.{layer_map[layer]}.")
        E = tensors[f"{prefix}.lora_E"]
        assert E.shape == (rank, 1) and bool((E[:-1] >= E[1:]).all())          # singular values, sorted
        Q = tensors[f"{prefix}.lora_A"].double()
        assert torch.allclose(Q @ Q.T, torch.eye(rank, dtype=torch.float64), atol=1e-5)   # orthonormal rows


def test_magnitude_fit_math():
    """m' = ⟨D_o, V_o⟩: exact for a row permutation and scaling of the carried weight, least squares otherwise."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 7, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 7, generator=g, dtype=torch.float64)
    gain = 0.5 + torch.rand(12, generator=g, dtype=torch.float64)
    target = gain[:, None] * (W + delta)
    fit = fit_magnitude(W, delta, target, "m")
    assert fit.relative_to_weight < 1e-6
    assert torch.allclose(fit.magnitude.double(), gain * torch.linalg.vector_norm(W + delta, dim=1), rtol=1e-6)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    W2, delta2 = rotation @ W, rotation @ delta
    fit2 = fit_magnitude(W2, delta2, rotation @ target, "m")
    assert fit2.relative_to_weight > 1e-3
    D = (W2 + delta2) / torch.linalg.vector_norm(W2 + delta2, dim=1, keepdim=True)
    for _ in range(3):                     # no other magnitude does better
        other = fit2.magnitude.double() + 0.01 * torch.randn(12, generator=g, dtype=torch.float64)
        assert float((other[:, None] * D - rotation @ target).norm()) > float((fit2.magnitude.double()[:, None] * D - rotation @ target).norm())
    zero = W.clone()
    zero[3] = 0
    with pytest.raises(LorasuiteError, match="1 output rows"):
        fit_magnitude(zero, torch.zeros_like(W), target, "m")


def test_variant_tensors_checked_and_round_trip_through_layer_results(tmp_path):
    from lorasuite_core.pipeline.layer_results import load_layer_result, save_layer_result
    from lorasuite_core.transfer.adapter import MigratedModule, NewLayerResult
    from lorasuite_core.transfer.refactor import refactorise

    model = make_tiny_model_dir("llama", tmp_path / "model", seed=34)
    family = load_base_model(model).family
    dora = make_dora_adapter(model, tmp_path / "dora", seed=4)
    factors = load_lora_adapter(dora, family).factors
    assert all(f.magnitude is not None and f.magnitude.shape == (f.B.shape[0],) for f in factors.values())
    tensors = load_file(dora / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, dora / "adapter_model.safetensors")
    with pytest.raises(LorasuiteError, match="lacks lora_magnitude_vector"):
        load_lora_adapter(dora, family)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=False)))
    with pytest.raises(LorasuiteError, match="unexpected tensor .*lora_magnitude_vector"):
        load_lora_adapter(dora, family)

    g = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 6, generator=g, dtype=torch.float64)
    svd = refactorise(delta, 3, 0.7, singular_values=True)
    plain = refactorise(delta, 3, 0.7)
    assert torch.allclose(svd.delta(0.7), plain.delta(0.7), atol=1e-5) and svd.residual == plain.residual
    modules = [MigratedModule(1, "q_proj", svd, 3, 8.0, [0]),
               MigratedModule(1, "o_proj", plain, 3, 8.0, [0], magnitude=torch.rand(8, generator=g),
                              magnitude_fit={"relative_to_weight": 0.25, "relative_to_change": 0.5})]
    back = load_layer_result(save_layer_result(NewLayerResult(modules, {}, {}, {"q"}), tmp_path / "layer"))
    assert torch.equal(back.modules[0].factors.E, svd.E) and back.modules[0].magnitude is None
    assert torch.equal(back.modules[1].magnitude, modules[1].magnitude) and back.modules[1].factors.E is None
    assert back.modules[1].magnitude_fit == modules[1].magnitude_fit


def test_vanilla_baseline_is_the_source_adapters_kind(tmp_path):
    """The baseline a DoRA source is held against is a fresh DoRA (it trains and loads in PEFT as one); an
    AdaLoRA source's is a LoRA at its initial rank; each kind has its own stage key."""
    from lorasuite_core.pipeline import plans
    from lorasuite_core.pipeline.options import AnalysisOptions
    from lorasuite_core.pipeline.options import MigrationOptions
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.train import train_lora

    model = make_tiny_model_dir("llama", tmp_path / "model", seed=35)
    family = load_base_model(model).family
    plan = plans.PairPlan(old_model=str(model), new_model=str(model), old_identity="o", new_identity="n",
                           analysis=AnalysisOptions(), calibration_identity="c", stage_keys={})
    options = MigrationOptions(lft_data="builtin:train")
    dora = load_lora_adapter(make_dora_adapter(model, tmp_path / "dora", seed=4, rank=4), family)
    adalora = load_lora_adapter(make_adalora_adapter(model, tmp_path / "ada", seed=5, init_r=6), family)
    plain = load_lora_adapter(make_dora_adapter(model, tmp_path / "plain", seed=4, rank=4), family)
    plain.config["use_dora"] = False
    jobs = {name: plans._vanilla_job(plan, a, options, "d") for name, a in
            (("dora", dora), ("adalora", adalora), ("lora", plain))}
    assert (jobs["dora"].use_dora, jobs["dora"].rank) == (True, 4)
    assert (jobs["adalora"].use_dora, jobs["adalora"].rank) == (False, 6)
    assert jobs["lora"].use_dora is False and jobs["lora"].key != jobs["dora"].key
    out = tmp_path / "vanilla-dora"
    train_lora(model, generate_problems(8, "train", 0), out, rank=4, alpha=8, targets=jobs["dora"].targets,
               config=TrainConfig(epochs=1, batch_size=4, show_progress=False), use_dora=True)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(out / "adapter_model.safetensors"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(out))
