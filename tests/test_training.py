"""Tests of LoRA training / light fine-tuning on a tiny random Llama (CPU, a few seconds each)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.training.task_data import Sample, format_prompt, generate_problems
from lorasuite_core.training.config import TrainConfig, default_lft_config
from lorasuite_core.training.train import (ADAPTER_WEIGHTS, SUMMARY_FILE, build_example, collate, light_finetune,
                                           load_for_light_finetune, load_tokenizer, prepare_fresh_lora, train_lora)
from tests.tiny_llama import build_tiny_model

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def samples():
    return generate_problems(16, "train", seed=0)


def quick_config(**overrides) -> TrainConfig:
    base = dict(lr=5e-3, epochs=1, batch_size=4, max_length=160, device="cpu", show_progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def lora_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / ADAPTER_WEIGHTS))


def test_prompt_tokens_are_masked(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    sample = Sample(instruction="Tom has 3 apples and gets 4 more. How many?", input="",
                    output="3 + 4 = 7. The answer is 7.", answer="7")
    example = build_example(tokenizer, sample, max_length=512)
    n_prompt = len(tokenizer(format_prompt(sample))["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"][n_prompt:], skip_special_tokens=True) == sample.output
    assert build_example(tokenizer, sample, max_length=n_prompt) is None  # no label survives truncation
    batch = collate([example, build_example(tokenizer, sample, max_length=n_prompt + 2)], tokenizer.pad_token_id)
    assert batch["labels"][1, n_prompt + 2:].eq(-100).all() and batch["attention_mask"][1].sum() == n_prompt + 2


def test_missing_target_modules_raise(tiny_model_dir):
    with pytest.raises(ValueError, match=r"\['query_key_value'\] not found"):
        prepare_fresh_lora(tiny_model_dir, targets=("q_proj", "query_key_value"), device="cpu")


def test_training_reduces_loss_and_saves_safetensors(tiny_model_dir, samples, tmp_path):
    config = quick_config(epochs=4, lr=1e-2)
    result = train_lora(tiny_model_dir, samples, tmp_path / "lora", rank=4, alpha=8, targets=TARGETS,
                        config=config)
    assert result.steps == 16 and len(result.losses) == 16
    assert sum(result.losses[-4:]) < sum(result.losses[:4])
    assert (tmp_path / "lora" / ADAPTER_WEIGHTS).is_file()
    assert not list((tmp_path / "lora").glob("*.bin"))
    summary = json.loads((tmp_path / "lora" / SUMMARY_FILE).read_text())
    assert summary["result"]["steps"] == 16 and summary["config"]["lr"] == 1e-2
    assert result.trainable_params > 0 and result.peak_rss_mb > 0 and result.peak_cuda_mb is None


def test_same_seed_gives_identical_adapter(tiny_model_dir, samples, tmp_path):
    runs = [train_lora(tiny_model_dir, samples, tmp_path / name, rank=4, alpha=8, targets=TARGETS,
                       config=quick_config(seed=seed, grad_accum=2))
            for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    a, b, c = (lora_tensors(r.out_dir) for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert runs[0].steps == 2  # 16 samples / batch 4 / grad_accum 2


@pytest.fixture(scope="module")
def source_adapter(tiny_model_dir, samples, tmp_path_factory):
    """A trained adapter with non-zero B (stands in for a migrated adapter)."""
    out = tmp_path_factory.mktemp("source_adapter")
    train_lora(tiny_model_dir, samples, out, rank=4, alpha=8, targets=TARGETS, config=quick_config(lr=1e-2))
    return out


def test_lft_starts_exactly_from_given_adapter(tiny_model_dir, source_adapter):
    from peft import get_peft_model_state_dict

    peft_model, _ = load_for_light_finetune(tiny_model_dir, source_adapter, device="cpu")
    on_disk = lora_tensors(source_adapter)
    in_model = get_peft_model_state_dict(peft_model)
    assert on_disk.keys() == in_model.keys()
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in on_disk.items())
    for key, tensor in on_disk.items():
        assert torch.equal(in_model[key].cpu(), tensor), key
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_light_finetune_updates_adapter_and_lowers_loss(tiny_model_dir, source_adapter, samples, tmp_path):
    config = default_lft_config(MigrationOptions().lft_lr, epochs=3, batch_size=4, max_length=160, device="cpu",
                                show_progress=False)
    assert config.lr == 9e-4 and config.warmup_ratio == 0.0
    result = light_finetune(tiny_model_dir, source_adapter, samples, tmp_path / "lft", config=config)
    before, after = lora_tensors(source_adapter), lora_tensors(tmp_path / "lft")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.steps == 12 and result.losses[-1] < result.losses[0]


def test_lft_errors(tiny_model_dir, tmp_path, samples):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_for_light_finetune(tiny_model_dir, tmp_path, device="cpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("gpt_neox", {}),
                                              ("gemma3", {}), ("gemma3", {"final_logit_softcapping": 3.0})])
def test_labelled_token_loss_equals_the_models_own_loss(family, overrides, tmp_path):
    from peft import get_peft_model

    from lorasuite_core.training.train import _lora_config, labelled_token_loss, load_causal_lm
    from lorasuite_core.testing.model import make_tiny_model_dir

    model_dir = make_tiny_model_dir(family, tmp_path / family, **overrides)
    model = load_causal_lm(model_dir, dtype="float32", device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, _lora_config(4, 8, ("query_key_value",) if family == "gpt_neox" else TARGETS))
    for p in peft_model.parameters():  # non-zero B, so the adapter takes part in both losses
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    tokenizer = load_tokenizer(model_dir)
    examples = [build_example(tokenizer, s, 160) for s in generate_problems(5, "train", seed=3)]
    batch = collate(examples, tokenizer.pad_token_id)
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompts and padding really are skipped
    expected = peft_model(**batch).loss
    got = labelled_token_loss(peft_model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.parameters() if p.requires_grad)


def test_bf16_autocast_training_matches_fp32_within_tolerance(tiny_model_dir, samples, tmp_path, monkeypatch):
    """bf16 autocast rounds the matrix products' inputs only: the trained adapter stays within bf16 rounding of the
    fp32 one (relative Frobenius error of each tensor's update), losses agree to a few 1e-3, weights stay fp32."""
    from lorasuite_core.training.devices import autocast_dtype, training_compute_dtype

    runs = {mode: train_lora(tiny_model_dir, samples, tmp_path / mode, rank=4, alpha=8, targets=TARGETS,
                             config=quick_config(epochs=2, lr=1e-2, autocast=mode))
            for mode in ("off", "bf16")}
    assert runs["off"].compute_dtype == "float32" and runs["bf16"].compute_dtype == "bfloat16"
    assert runs["bf16"].dtype == "float32"                       # weights (and optimizer state) stay fp32
    fp32, bf16 = lora_tensors(runs["off"].out_dir), lora_tensors(runs["bf16"].out_dir)
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)   # it really ran in bf16
    # B starts at 0, so its value is the whole update; Adam's normalised steps amplify the rounding of small
    # gradients (measured: 0.3-6% per tensor after 8 steps at lr 1e-2), so the bound is on the whole update
    b_keys = [k for k in fp32 if "lora_B" in k]
    difference = torch.cat([(bf16[k] - fp32[k]).flatten() for k in b_keys]).norm()
    assert difference / torch.cat([fp32[k].flatten() for k in b_keys]).norm() < 0.05
    assert all((bf16[k] - fp32[k]).norm() / fp32[k].norm() < 0.15 for k in b_keys)
    torch.testing.assert_close(torch.tensor(runs["bf16"].losses), torch.tensor(runs["off"].losses), rtol=2e-2,
                               atol=1e-3)
    # "auto" follows the hardware, fp16/bf16 weights never get autocast on top, and the name goes into stage keys
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu, torch.float32) is None and autocast_dtype("bf16", cpu, torch.bfloat16) is None
    from lorasuite_core.training import devices

    for has_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: has_bf16)
        assert autocast_dtype("auto", cpu, torch.float32) is expected
        assert training_compute_dtype("auto", "cpu") == ("bfloat16" if has_bf16 else "float32")
