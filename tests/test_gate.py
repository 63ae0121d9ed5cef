"""The quality gate: the decision on numbers, and on a tiny exact upgrade a good vs a zeroed adapter (CPU, seconds)."""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.gate import (DEFAULT_MARGIN, QualityGateFailed, check_gate, gate_decision,
                                         quality_gate)
from lorasuite_core.training.task_data import generate_problems
from lorasuite_core.training.train import ADAPTER_WEIGHTS
from tests.distill_setup import build_exact_pair

GEN = {"max_new_tokens": 16, "batch_size": 8}


def test_gate_decision_on_numbers():
    good = gate_decision(0.9, 0.2, n=20)
    assert good.passed and good.margin == DEFAULT_MARGIN and good.student_accuracy is None
    assert good.reason.startswith("passed: teacher agreement 0.900 (bare new model 0.200, margin 0.05, 20 held-out")
    assert check_gate(good) is good
    assert gate_decision(0.25, 0.2, n=20).passed  # exactly bare + margin (5 and 4 of 20) clears it
    equal = gate_decision(0.5, 0.5, n=8)
    assert not equal.passed and "below the bare model + margin: teacher agreement 0.500" in equal.reason
    assert gate_decision(0.5, 0.5, n=8, margin=0.0).passed
    worse = gate_decision(0.9, 0.2, n=20, student_accuracy=0.30, bare_accuracy=0.40, teacher_accuracy=0.5)
    assert not worse.passed and worse.accuracy_margin == 0.0  # with gold answers: not worse than the bare model
    assert "accuracy 0.300 (bare new model 0.400, margin 0)" in worse.reason and "agreement" not in worse.reason
    assert gate_decision(0.9, 0.2, n=20, student_accuracy=0.40, bare_accuracy=0.40).passed
    assert not gate_decision(0.9, 0.2, n=20, student_accuracy=0.40, bare_accuracy=0.40, accuracy_margin=0.05).passed
    with pytest.raises(QualityGateFailed) as failure:
        check_gate(worse)
    assert isinstance(failure.value, LorasuiteError) and failure.value.result is worse
    assert str(failure.value).startswith("quality gate failed: below the bare model + margin: accuracy 0.300")
    assert pickle.loads(pickle.dumps(failure.value)).result == worse
    assert worse.to_dict()["bare_accuracy"] == 0.40
    with pytest.raises(LorasuiteError, match=r"margin must be in \[-1, 1\]"):
        gate_decision(0.9, 0.2, n=20, margin=1.5)


@pytest.fixture(scope="module")
def gate_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate_pair")
    pair = build_exact_pair(root)
    zeroed = root / "zeroed"
    shutil.copytree(pair["migrated"], zeroed)
    tensors = load_file(str(zeroed / ADAPTER_WEIGHTS))
    assert any("lora_B" in k for k in tensors)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, str(zeroed / ADAPTER_WEIGHTS))
    samples = generate_problems(8, "test", 0)
    prompts = P.prompts_from_samples(samples)
    teacher, tokenizer = D.load_for_generation(pair["old"], pair["adapter"], dtype="float32", device="cpu")
    teacher_completions = D.greedy_completions(teacher, tokenizer, prompts, **GEN)
    return {**pair, "zeroed": zeroed, "prompts": prompts, "answers": [s.answer for s in samples],
            "teacher": teacher_completions}


def _gate(setup, adapter, **kwargs):
    return quality_gate(setup["new"], setup[adapter], setup["prompts"], setup["teacher"], dtype="float32",
                        device="cpu", **GEN, **kwargs)


def test_gate_publishes_the_migrated_adapter_and_refuses_a_zeroed_one(gate_setup):
    good = _gate(gate_setup, "migrated")
    assert good.passed and good.n == 8 and good.student_agreement == 1.0  # exact migration: the teacher's text
    assert good.bare_agreement <= 1.0 - DEFAULT_MARGIN
    zeroed = _gate(gate_setup, "zeroed")
    assert not zeroed.passed
    assert zeroed.student_agreement == zeroed.bare_agreement == good.bare_agreement  # B = 0 is the bare model
    with pytest.raises(QualityGateFailed, match=rf"teacher agreement {zeroed.student_agreement:.3f} \(bare new model "
                                                rf"{zeroed.bare_agreement:.3f}, margin 0.05, 8 held-out prompts\)"):
        check_gate(zeroed)


def test_gate_with_labelled_data_records_accuracies(gate_setup):
    answers = gate_setup["answers"]
    result = _gate(gate_setup, "migrated", answers=answers)
    reference = [D.accuracy(gate_setup["teacher"], answers)]
    assert result.teacher_accuracy == reference[0] and result.student_accuracy == reference[0]  # same text as teacher
    assert result.bare_accuracy is not None and result.passed == (result.student_accuracy >= result.bare_accuracy)
    reused = _gate(gate_setup, "migrated", student_completions=gate_setup["teacher"])
    assert reused.student_agreement == 1.0 and reused.bare_agreement == result.bare_agreement
    with pytest.raises(ValueError, match="3 gold answers for 8"):
        _gate(gate_setup, "migrated", answers=answers[:3])


def test_gate_judges_a_word_answer_skill_by_its_scorer(gate_setup):
    from lorasuite_core.training import skills

    skill = skills.get_skill("family_relationships")
    samples = skill.samples("test", 4, 0)
    prompts = P.prompts_from_samples(samples)
    assert all(p.task == skill.name for p in prompts)
    teacher = [s.output for s in samples]                                  # "The answer is <word>."
    student = [f"Let me see. The answer is {s.answer.capitalize()}." for s in samples[:3]] + ["The answer is nobody."]
    result = quality_gate(gate_setup["new"], gate_setup["migrated"], prompts, teacher, answers=samples,
                          student_completions=student, dtype="float32", device="cpu", batch_size=8)
    assert result.student_agreement == 0.75            # the same word counts; the final-number rule would give 0
    assert result.bare_agreement == 0.0 and result.passed   # the tiny bare model writes no family word
    assert result.student_accuracy == 0.75 and result.teacher_accuracy == 1.0 and result.bare_accuracy == 0.0
    assert D.teacher_agreement(student, teacher) == 0.0
