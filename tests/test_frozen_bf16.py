"""Frozen linear weights held in bf16 during bf16-autocast training (lorasuite_core.training.frozen_bf16): which
tensors, given back exactly, and training bit-identical with and without it (tiny models, CPU, seconds)."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.training import distill as D
from lorasuite_core.training import frozen_bf16 as F
from lorasuite_core.training import train as T
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import build_exact_pair
from tests.test_distill import GEN, lft_config
from tests.tiny_llama import build_tiny_model


def bf16_checkpoint(source, target):
    """A copy of a model directory whose weights are bf16 values saved as float32 (a bf16 release loaded in fp32)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    model.save_pretrained(str(target), safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen_bf16")
    fp32 = build_tiny_model(root / "fp32")
    return {"fp32": fp32, "bf16": bf16_checkpoint(fp32, root / "bf16")}


@contextlib.contextmanager
def nothing_held(model, mixed):
    yield F.Bf16Weights([])


def spy(monkeypatch) -> list:
    """Record what each training loop held (and check the weights while they are held)."""
    seen = []
    real = F.bf16_frozen_linears

    @contextlib.contextmanager
    def recording(model, mixed):
        with real(model, mixed) as held:
            seen.append([(t, t.dtype) for t in held.tensors])     # the dtype while held
            yield held

    monkeypatch.setattr(T, "bf16_frozen_linears", recording)
    return seen


def test_which_tensors_are_held(models):
    from peft import LoraConfig, get_peft_model

    base = T.load_causal_lm(models["bf16"], dtype="float32", device="cpu")
    base.lm_head.weight = base.model.embed_tokens.weight                     # tie the LM head
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=False)
    model = get_peft_model(base, config)
    model.base_model.model.model.layers[0].self_attn.v_proj.use_dora["default"] = True   # mark one DoRA module
    held = {id(t) for t in F.frozen_linear_tensors(model)}
    layer0 = model.base_model.model.model.layers[0]
    assert id(layer0.mlp.down_proj.weight) in held and id(layer0.self_attn.q_proj.base_layer.weight) in held
    assert id(layer0.self_attn.v_proj.base_layer.weight) not in held                      # DoRA base
    assert id(base.model.embed_tokens.weight) not in held                                 # tied head
    assert not any(id(p) in held for n, p in model.named_parameters() if "lora_" in n)   # trainable
    fp32 = T.load_causal_lm(models["fp32"], dtype="float32", device="cpu")
    assert F.frozen_linear_tensors(fp32.requires_grad_(False)) == []                      # not lossless


def test_weights_come_back_exactly(models):
    model = T.load_causal_lm(models["bf16"], dtype="float32", device="cpu").requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weight = model.model.layers[1].mlp.up_proj.weight
    with F.bf16_frozen_linears(model, torch.bfloat16) as held:
        assert held.tensors and weight.dtype == torch.bfloat16
        with held.float32():
            assert weight.dtype == torch.float32 and torch.equal(weight, before["model.layers.1.mlp.up_proj.weight"])
        assert weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    with F.bf16_frozen_linears(model, None) as held:                                      # no bf16 autocast: nothing
        assert held.tensors == [] and weight.dtype == torch.float32


def test_training_is_bit_identical(models, tmp_path, monkeypatch):
    samples = generate_problems(8, "train", seed=0)
    config = T.TrainConfig(lr=5e-3, epochs=2, batch_size=4, max_length=160, device="cpu", show_progress=False,
                           autocast="bf16")
    seen = spy(monkeypatch)
    held = T.train_lora(models["bf16"], samples, tmp_path / "held", targets=("q_proj", "down_proj"), config=config)
    assert seen[-1] and all(dtype == torch.bfloat16 for _, dtype in seen[-1])
    assert all(t.dtype == torch.float32 for t, _ in seen[-1])                 # given back after the loop
    monkeypatch.setattr(T, "bf16_frozen_linears", nothing_held)
    plain = T.train_lora(models["bf16"], samples, tmp_path / "plain", targets=("q_proj", "down_proj"), config=config)
    assert held.losses == plain.losses
    a, b = (load_file(str(tmp_path / name / T.ADAPTER_WEIGHTS)) for name in ("held", "plain"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_scores_in_float32_while_weights_are_held(tmp_path, monkeypatch):
    """Student and teacher held (the teacher's KL term runs in the loop); early stopping scores in float32."""
    pair = build_exact_pair(tmp_path / "pair")
    new = bf16_checkpoint(pair["new"], tmp_path / "new-bf16")
    old = bf16_checkpoint(pair["old"], tmp_path / "old-bf16")
    teacher, tokenizer = D.load_for_generation(old, pair["adapter"], dtype="float32", device="cpu")
    from lorasuite_core.training import prompts as P

    train = P.prompts_from_samples(generate_problems(8, "train", 1))
    heldout = P.prompts_from_samples(generate_problems(4, "train", 2))
    targets = D.greedy_completions(teacher, tokenizer, train, **GEN)
    heldout_teacher = D.greedy_completions(teacher, tokenizer, heldout, **GEN)

    def run(out):
        config = lft_config(lr=1e-3, epochs=2, lr_schedule="constant", autocast="bf16")
        return D.distill_finetune(new, pair["migrated"], train, targets, out, config=config, teacher=teacher,
                                  teacher_tokenizer=tokenizer, token_map=D.TokenMap.between(tokenizer, tokenizer),
                                  kl_weight=1.0, patience=2, heldout=heldout,
                                  heldout_teacher=heldout_teacher, gen=GEN)

    seen = spy(monkeypatch)
    held = run(tmp_path / "held")
    student_held, teacher_held = seen                                  # one loop: the student's, then the teacher's
    assert student_held and teacher_held and all(t.dtype == torch.float32 for t, _ in student_held + teacher_held)
    assert held.mode == D.MODE_KL and held.kl_positions > 0
    monkeypatch.setattr(T, "bf16_frozen_linears", nothing_held)
    plain = run(tmp_path / "plain")
    assert held.early_stopping.to_dict() == plain.early_stopping.to_dict()
    a, b = (load_file(str(tmp_path / name / T.ADAPTER_WEIGHTS)) for name in ("held", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_lossless_check_reads_every_chunk(monkeypatch):
    monkeypatch.setattr(F, "CHECK_CHUNK", 7)
    exact = torch.randn(40, 9).to(torch.bfloat16).float()
    assert F._lossless(exact)
    exact[-1, -1] = 0.1                          # 0.1 is no bf16 value; the last element, in the last chunk
    assert not F._lossless(exact)
    assert F._lossless(torch.tensor([float("inf"), -0.0, 1.0])) and not F._lossless(torch.tensor([1.0 + 2 ** -10]))
