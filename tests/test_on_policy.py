"""On-policy distillation (GKD) on a tiny exact upgrade: the loss against a hand-computed KL on the student's own
samples, no gradient where the student already is the teacher, the mix of batches, determinism and the options."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.pipeline.plans import _on_policy
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.consistency import sampled_completions
from lorasuite_core.training.on_policy import SAMPLE_TEMPERATURE, on_policy_loss
from lorasuite_core.training.task_data import generate_problems
from lorasuite_core.training.train import ADAPTER_WEIGHTS, load_for_light_finetune
from tests.test_distill import GEN, lft_config, pair, teacher  # noqa: F401 (pair, teacher: the fixtures)


def _chunk(student_tok, teacher_model, teacher_tok, prompts):
    completions = D.greedy_completions(teacher_model, teacher_tok, prompts, **GEN)
    token_map = D.TokenMap.between(teacher_tok, student_tok)
    return D.distillation_examples(student_tok, teacher_tok, prompts, completions, 256, token_map), token_map


def _loss(teacher_model, teacher_tok, student_tok, token_map, seed=5, max_length=512):
    off = D.distillation_loss(teacher_model, token_map, kl_weight=1.0, temperature=1.0,
                              student_pad_id=student_tok.pad_token_id, teacher_pad_id=teacher_tok.pad_token_id)
    return on_policy_loss(off, share=1.0, seed=seed, teacher=teacher_model, tokenizer=student_tok,
                          teacher_tokenizer=teacher_tok, token_map=token_map, kl_temperature=1.0, max_length=max_length,
                          batch_size=8)


def test_on_policy_loss_is_the_teachers_kl_on_the_students_own_samples(pair, teacher):
    """KL teacher = the bare old model (far from the student): the loss is mean_positions KL(p_T || p_S) over the
    student's own sampled answers and their EOS positions, computed here one sample at a time in float64."""
    teacher_model, teacher_tok = teacher
    bare, _ = D.load_for_generation(pair["old"], dtype="float32", device="cpu")
    student, student_tok = load_for_light_finetune(pair["new"], pair["migrated"], dtype="float32", device="cpu")
    prompts = P.prompts_from_samples(generate_problems(3, "train", 7))
    chunk, token_map = _chunk(student_tok, teacher_model, teacher_tok, prompts)
    loss_fn, counts = _loss(bare, teacher_tok, student_tok, token_map)
    loss = loss_fn(student, chunk)
    assert counts.on_policy_batches == 1 and counts.off_policy_batches == 0

    student.eval()
    samples = [s[0] for s in sampled_completions(student, student_tok, prompts, 1, seed=5 * 100_003,
                                                 temperature=SAMPLE_TEMPERATURE, batch_size=8)]
    greedy = D.greedy_completions(student, student_tok, prompts, **GEN)
    assert [s.ids for s in samples] != [g.ids for g in greedy]     # sampled, not the greedy answers
    rows = []
    with torch.no_grad():
        for prompt, sample in zip(prompts, samples):
            ids = student_tok(prompt.formatted(), add_special_tokens=True)["input_ids"]
            full = torch.tensor([ids + list(sample.ids) + [student_tok.eos_token_id]])
            assert full.shape[1] <= 512          # nothing cut at the loss's max_length
            start = len(ids) - 1             # the row predicting the first answer token
            p = torch.softmax(bare(input_ids=full).logits[0, start:-1].double(), -1)
            q = torch.softmax(student(input_ids=full).logits[0, start:-1].double(), -1)
            rows.append((p * (p.log() - q.log())).sum(-1))
    reference = torch.cat(rows).mean()
    assert counts.kl_positions == sum(len(s.ids) + 1 for s in samples) == len(torch.cat(rows))
    assert reference > 0.1
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-6)


def test_a_student_that_is_the_teacher_gets_no_on_policy_gradient(pair, teacher):
    """Exact upgrade: the migrated student computes the teacher's function, so KL = 0 on any sample."""
    teacher_model, teacher_tok = teacher
    student, student_tok = load_for_light_finetune(pair["new"], pair["migrated"], dtype="float32", device="cpu")
    prompts = P.prompts_from_samples(generate_problems(3, "train", 8))
    chunk, token_map = _chunk(student_tok, teacher_model, teacher_tok, prompts)
    loss_fn, counts = _loss(teacher_model, teacher_tok, student_tok, token_map)
    loss = loss_fn(student, chunk)
    loss.backward()
    assert counts.on_policy_batches == 1 and abs(loss.item()) < 1e-5
    grads = [p.grad.abs().max().item() for p in student.parameters() if p.requires_grad and p.grad is not None]
    assert grads and max(grads) < 1e-4


def test_on_policy_distillation_mixes_batches_deterministically(pair, teacher, tmp_path):
    teacher_model, teacher_tok = teacher
    bare, _ = D.load_for_generation(pair["old"], dtype="float32", device="cpu")
    prompts = P.prompts_from_samples(generate_problems(8, "train", 9))
    completions = D.greedy_completions(teacher_model, teacher_tok, prompts, **GEN)
    identity = D.TokenMap.between(teacher_tok, teacher_tok)
    config = lft_config(batch_size=2, lr=1e-4)

    def run(name, share):
        return D.distill_finetune(pair["new"], pair["migrated"], prompts, completions, tmp_path / name, config=config,
                                  teacher=bare, teacher_tokenizer=teacher_tok, token_map=identity, on_policy=share,
                                  gen={"batch_size": 8})

    mixed, again, plain = run("mixed", 0.5), run("again", 0.5), run("plain", 0.0)
    on, off = mixed.on_policy.on_policy_batches, mixed.on_policy.off_policy_batches
    assert on + off == 4 and on >= 1 and off >= 1          # 8 prompts in micro-batches of 2; seeded coin
    assert mixed.to_dict()["on_policy"]["share"] == 0.5 and "on_policy" not in plain.to_dict()
    weights = {name: load_file(str(tmp_path / name / ADAPTER_WEIGHTS)) for name in ("mixed", "again", "plain")}
    assert all(torch.equal(weights["mixed"][k], weights["again"][k]) for k in weights["mixed"])   # same seed
    assert any(not torch.equal(weights["mixed"][k], weights["plain"][k]) for k in weights["mixed"])
    assert mixed.training.losses != plain.training.losses
    # no token map (the pair's vocabularies decide it at run time): off-policy throughout, and the report says why
    nomap = D.distill_finetune(pair["new"], pair["migrated"], prompts, completions, tmp_path / "nomap", config=config,
                               teacher=bare, teacher_tokenizer=teacher_tok, token_map=None, on_policy=0.5)
    skipped = nomap.to_dict()["on_policy"]
    assert skipped["on_policy_batches"] == 0 and "token-level KL term is off" in skipped["skipped"]
    assert nomap.mode == D.MODE_SEQUENCE


def test_on_policy_options_need_distillation_and_the_kl_term():
    assert MigrationOptions().lft_on_policy == 0 and _on_policy(MigrationOptions()) == {}
    options = MigrationOptions(lft_mode="distill", lft_on_policy=0.5)
    assert _on_policy(options)["on_policy"][0] == 0.5
    with pytest.raises(ValueError, match="lft_on_policy .* needs lft_mode distill"):
        MigrationOptions(lft_mode="labelled", lft_on_policy=0.5)
    with pytest.raises(ValueError, match="lft_kl_weight 0 turns it off"):
        MigrationOptions(lft_mode="distill", lft_on_policy=0.5, lft_kl_weight=0)
    with pytest.raises(ValueError):
        MigrationOptions(lft_mode="distill", lft_on_policy=1.5)
