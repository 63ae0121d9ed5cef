"""Bad input: one clear line on stderr, exit status 2, nothing written at the output."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from flows.cli import main
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    old = make_tiny_model_dir("llama", root / "old", seed=3)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True))
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=4)
    return root, old, new, adapter


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_migrate(old, new, adapter, out, *extra):
    return main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--max-calibration-tokens", "256", *extra])


def assert_fails_cleanly(capsys, code, out, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("lorasuite: error: ")
    for needle in needles:
        assert needle in last, last
    assert not out.exists() or not any(out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert leftovers == []


def test_adapter_for_another_model(pair, tmp_path, capsys):
    root, old, new, _ = pair
    other = make_tiny_model_dir("llama", tmp_path / "other", seed=5, hidden_size=32, head_dim=8)
    adapter = make_random_lora_adapter(other, tmp_path / "other-adapter", rank=2, alpha=4, seed=1)
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, new, adapter, out), out, "not trained on this model")


def test_target_module_unknown_to_family(pair, tmp_path, capsys):
    root, old, new, _ = pair
    model = AutoModelForCausalLM.from_pretrained(old)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    peft_model.save_pretrained(tmp_path / "lm-head-adapter")
    out = tmp_path / "out"
    code = run_migrate(old, new, tmp_path / "lm-head-adapter", out)
    assert_fails_cleanly(capsys, code, out, "lm_head", "llama")


def test_unsupported_model_type(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    bad = copy(new, tmp_path / "bert")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, bad, adapter, out), out, "'bert'", "gemma3_text", "gpt_neox", "llama", "qwen2")


def test_missing_safetensors(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    bad = copy(new, tmp_path / "empty")
    (bad / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, bad, adapter, out), out, "no *.safetensors")


def test_corrupt_safetensors(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    bad = copy(new, tmp_path / "corrupt")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, bad, adapter, out), out, "corrupt safetensors")


def test_pickle_checkpoint_refused(pair, tmp_path, capsys, monkeypatch):
    root, old, new, adapter = pair
    bad = copy(new, tmp_path / "pickled")
    (bad / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a) or {})
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, bad, adapter, out), out, "pickle", "safetensors")
    assert loaded == [], "a pickle file must never be loaded"


def test_pickle_adapter_refused(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    bad = copy(adapter, tmp_path / "pickled-adapter")
    (bad / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, bad / "adapter_model.bin")
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, new, bad, out), out, "adapter_model.safetensors", "pickle")


def test_too_few_shared_tokens(tmp_path, capsys):
    wide = make_tiny_model_dir("llama", tmp_path / "wide", seed=6, hidden_size=1024, head_dim=256, intermediate_size=64)
    adapter = make_random_lora_adapter(wide, tmp_path / "wide-adapter", rank=2, alpha=4, seed=1)
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(wide, wide, adapter, out), out, "shared", "hidden size 1024")


def test_existing_output_needs_overwrite(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    out = tmp_path / "out"
    assert run_migrate(old, new, adapter, out) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    code = run_migrate(old, new, adapter, out)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--overwrite" in err
    assert run_migrate(old, new, adapter, out, "--overwrite") == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first


def test_foreign_output_is_never_replaced(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for extra in ((), ("--overwrite",)):
        code = run_migrate(old, new, adapter, out, *extra)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and "not written by lorasuite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_adapter_type_other_than_lora(pair, tmp_path, capsys):
    root, old, new, _ = pair
    model = AutoModelForCausalLM.from_pretrained(old)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "ia3")
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, new, tmp_path / "ia3", out), out, "IA3", "is not supported (LoRA, DoRA or AdaLoRA)")


def test_unknown_head_transform_rejected(pair, tmp_path):
    root, old, new, adapter = pair
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
              "--output", str(out), "--no-lft", "--head-transform", "nonsense"])
    assert exit_info.value.code == 2
    assert not out.exists()


def test_lft_needs_data(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    out = tmp_path / "out"
    code = main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--lft"])
    assert_fails_cleanly(capsys, code, out, "--lft-data", "--no-lft")


def test_migrate_with_lft_and_evaluation(pair, tmp_path):
    root, old, new, adapter = pair
    out = tmp_path / "out"
    code = main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--lft-data", "builtin:train", "--lft-samples", "4", "--eval-data",
                 "builtin:test", "--eval-samples", "2", "--max-calibration-tokens", "256"])
    assert code == 0
    report = json.loads((out / "migration_report.json").read_text())
    assert report["light_finetune"]["n_samples"] == 4 and report["light_finetune"]["steps"] >= 1
    rows = report["evaluation"]
    assert len(rows) >= 4 and all(row["n"] == 2 for row in rows.values())
    assert report["steps"]["lft"]["cache"] == "computed" and report["steps"]["eval"]["cache"] == "computed"


def test_non_finite_adapter_tensor_is_named_before_any_analysis(pair, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, old, new, adapter = pair
    bad = copy(adapter, tmp_path / "nan-adapter")
    tensors = load_file(bad / "adapter_model.safetensors")
    name = sorted(tensors)[1]
    tensors[name][0, 0] = float("inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = run_migrate(old, new, bad, out, "--cache-root", str(cache))
    assert_fails_cleanly(capsys, code, out, name, "NaN or Inf")
    assert not cache.exists() or not any(p for p in cache.rglob("_stage.json")), "analysis ran before the check"


def test_cache_root_that_is_a_file(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    cache = tmp_path / "cache-file"
    cache.write_text("not a directory")
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, run_migrate(old, new, adapter, out, "--cache-root", str(cache)), out,
                         "Not a directory")
    assert cache.read_text() == "not a directory"


def test_copy_route_refused_on_a_shape_mismatch_before_any_analysis(pair, tmp_path, capsys):
    root, old, _, adapter = pair
    wider = upgrade_model_dir(old, tmp_path / "wider", UpgradeSpec(extra_neurons=8))
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = run_migrate(old, wider, adapter, out, "--route", "copy", "--cache-root", str(cache))
    assert_fails_cleanly(capsys, code, out, "route copy needs the same architecture, shapes and vocabulary",
                         "intermediate 128 vs 136", "--route transfer")
    assert not cache.exists() or not any(p for p in cache.rglob("_stage.json")), "analysis ran before the check"


def test_seed_prompts_without_a_question_refused_before_any_analysis(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Add 6 + 1 + 3 =\nState the final answer: 91 - 78 + 35 =\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--lft-mode", "distill", "--lft-seed-prompts", str(seeds),
                 "--max-calibration-tokens", "256", "--cache-root", str(cache)])
    assert_fails_cleanly(capsys, code, out, "none of the 2 seed prompts is one", "--lft-prompts")
    assert not cache.exists() or not any(p for p in cache.rglob("_stage.json")), "analysis ran before the check"
    assert seeds.read_text().startswith("Add 6 + 1 + 3 =")
