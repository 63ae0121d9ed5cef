"""Distilled LFT and the quality gate through the one stage graph (options -> stages -> report)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.pipeline import pair_stages, stages
from lorasuite_core.training import heldout
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.testing.adapter import make_random_lora_adapter, zeroed_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import upgrade_model_dir
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.gate import QualityGateFailed
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import EXACT

SMALL = AnalysisOptions(max_calibration_tokens=256)


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-pipeline")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", EXACT)
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=3)
    prompts = root / "prompts.txt"           # unlabelled: prompts only, no answers
    prompts.write_text("\n".join(s.instruction for s in generate_problems(12, "train", seed=2)) + "\n")
    yield {"root": root, "old": old, "new": new, "adapter": adapter, "prompts": prompts}
    pair_stages.clear_memo()


def test_distilled_lft_from_unlabelled_prompts_and_the_gate(exact):
    root = exact["root"]
    # lr 1e-5: tiny random models sit on near-tied greedy choices, where a normal LFT step changes the text;
    # float32 generation: an exact upgrade's greedy answers are equal there (bf16 rounds the two widths apart)
    options = MigrationOptions(lft_mode="distill", lft_prompts=str(exact["prompts"]), lft_samples=8, lft_lr=1e-5,
                               gate=True, gate_prompts=4, generation_dtype="float32")
    report = stages.migrate_in_process(exact["old"], exact["new"], exact["adapter"], root / "out", options, SMALL,
                                       cache_root=str(root / "store"))
    lft = report["light_finetune"]
    assert lft["lft_mode"] == "distill" and lft["prompt_source"] == "file"
    assert lft["n_prompts"] == 8 and lft["n_heldout"] == 4
    assert lft["teacher_agreement_before"] == 1.0 and lft["teacher_agreement_after"] == 1.0   # an exact upgrade
    gate = report["quality_gate"]
    assert gate["passed"] and gate["student_agreement"] == 1.0 and gate["n"] == 4
    assert gate["student_agreement"] >= gate["bare_agreement"] + 0.05
    assert report["options"]["lft_mode"] == "distill" and report["steps"]["gate"]["cache"] == "computed"
    # the gate reused distillation's held-out completions: they are what generating them afresh gives
    assert gate["reused_completions"] is True
    # fidelity after the transfer and after LFT, on distillation's held-out prompts and teacher answers
    fidelity = report["fidelity"]
    assert fidelity["prompts"] == "distillation" and fidelity["reused_completions"] is True and fidelity["n"] == 4
    assert set(fidelity["fidelity"]) == {"transfer", "lft"} and gate["fidelity"] == fidelity["fidelity"]
    assert fidelity["fidelity"]["transfer"] == pytest.approx(1.0, abs=1e-3)   # an exact upgrade
    assert fidelity["fidelity"]["lft"] == pytest.approx(1.0, abs=0.05)        # lr 1e-5 barely moves it
    [heldout_file] = (root / "store" / "lft").rglob(heldout.HELDOUT)
    prompts, teacher, student = heldout.read_heldout(heldout_file)
    assert len(prompts) == 4 and teacher is not None and student is not None
    for model_dir, adapter_dir, stored in ((exact["old"], exact["adapter"], teacher),
                                           (exact["new"], heldout_file.parent, student)):
        model, tokenizer = D.load_for_generation(model_dir, adapter_dir)
        assert D.greedy_completions(model, tokenizer, prompts) == stored
    trained = load_file(root / "out" / "adapter_model.safetensors")
    migrated_only = stages.migrate_in_process(exact["old"], exact["new"], exact["adapter"], root / "transfer",
                                              MigrationOptions(lft=False), SMALL, cache_root=str(root / "store"))
    assert migrated_only["steps"]["vocabulary"]["cache"] == "reused"
    transfer = load_file(root / "transfer" / "adapter_model.safetensors")
    assert any(not torch.equal(trained[k], transfer[k]) for k in transfer if "lora_B" in k)   # it did train


def test_the_gate_refuses_an_adapter_no_better_than_the_bare_model(exact):
    root = exact["root"]
    zeroed = zeroed_adapter(exact["adapter"], root / "zeroed")
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output,
                                             "answer": s.answer}) + "\n" for s in generate_problems(4, "test", 1)))
    options = MigrationOptions(lft=False, gate=True, eval_data=str(eval_data), gate_prompts=4)
    with pytest.raises(QualityGateFailed, match=r"quality gate failed: below the bare model \+ margin: teacher "
                                                r"agreement 1\.000 \(bare new model 1\.000, margin 0\.05"):
        stages.migrate_in_process(exact["old"], exact["new"], zeroed, root / "refused", options, SMALL,
                                  cache_root=str(root / "store"))
    assert not (root / "refused").exists()                   # nothing published


def test_the_teacher_answers_once_for_fidelity_and_the_gate(exact, monkeypatch):
    """With evaluation data, fidelity and the gate: the teacher (old model + source adapter) generates its
    answers once (the teacher stage), and fidelity and the gate read them from the teacher entry."""
    from lorasuite_core.training import distill as D

    root = exact["root"]
    eval_data = root / "eval-once.jsonl"
    eval_data.write_text("".join(json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output,
                                             "answer": s.answer}) + "\n" for s in generate_problems(4, "test", 7)))
    loads, calls = [], []
    original, original_teachers = D.load_for_generation, D.teacher_completions

    def counted(model_dir, *adapters, **kwargs):
        loads.append([str(a) for a in adapters])
        return original(model_dir, *adapters, **kwargs)

    def teachers(model_dir, prompts_by_adapter, **kwargs):
        calls.append({name: str(adapter) for name, (adapter, _) in prompts_by_adapter.items()})
        return original_teachers(model_dir, prompts_by_adapter, **kwargs)

    monkeypatch.setattr(D, "load_for_generation", counted)
    monkeypatch.setattr(D, "teacher_completions", teachers)
    options = MigrationOptions(lft=False, gate=True, fidelity=True, eval_data=str(eval_data), gate_prompts=4)
    report = stages.migrate_in_process(exact["old"], exact["new"], exact["adapter"], root / "once", options, SMALL,
                                       cache_root=str(root / "store"))
    assert calls == [{"a0": str(exact["adapter"])}]          # one teacher generation, in the teacher stage
    assert [str(exact["adapter"])] not in loads              # nobody else loads the teacher to generate
    assert report["quality_gate"]["passed"] and report["fidelity"]["fidelity"]["transfer"] > 0.99
    assert report["fidelity"]["prompts"] == "evaluation data" and report["steps"]["teacher"]["cache"] == "computed"


def test_seed_prompts_are_synthesised_by_the_teacher_excluding_evaluation_prompts(exact, monkeypatch):
    """The stage's wiring of synthesis: n = lft_samples (held out: the evaluation data), the seed, the exclusions,
    and the writer: the old model without the adapter."""
    from lorasuite_core.training import prompts

    root = exact["root"]
    seeds = root / "seeds.txt"
    seeds.write_text("What is 2 plus 3?\nHow many apples are left if 4 of 9 are eaten?\n")
    eval_data = root / "eval-seeds.jsonl"
    eval_samples = generate_problems(3, "test", 5)
    eval_data.write_text("".join(json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output,
                                             "answer": s.answer}) + "\n" for s in eval_samples))
    calls = []

    def synthesise(model, tokenizer, seed_prompts, n, *, seed=0, exclude=(), config=None):
        calls.append({"seeds": [p.text for p in seed_prompts], "n": n, "seed": seed, "exclude": list(exclude),
                      "writer_has_adapter": hasattr(model, "peft_config")})
        return [prompts.Prompt(s.instruction) for s in generate_problems(n, "train", seed=9)]

    monkeypatch.setattr(prompts, "synthesise_prompts", synthesise)
    options = MigrationOptions(lft_mode="distill", lft_seed_prompts=str(seeds), lft_samples=5, lft_lr=1e-5,
                               eval_data=str(eval_data), gate_prompts=3, seed=7)
    report = stages.migrate_in_process(exact["old"], exact["new"], exact["adapter"], root / "from-seeds", options,
                                       SMALL, cache_root=str(root / "store"))
    assert calls == [{"seeds": ["What is 2 plus 3?", "How many apples are left if 4 of 9 are eaten?"], "n": 5,
                      "seed": 7, "exclude": [s.instruction for s in eval_samples], "writer_has_adapter": False}]
    lft = report["light_finetune"]
    assert lft["prompt_source"] == "synthesised" and lft["n_prompts"] == 5 and lft["n_heldout"] == 3


def test_held_out_records_round_trip_and_malformed_ones_are_one_line_errors(tmp_path):
    from lorasuite_core.errors import LorasuiteError

    prompts = [P.Prompt("What is 2 plus 3?"), P.Prompt("Add", "4 and 5", task="arithmetic")]
    teacher = [D.Completion(" 5", (20,)), D.Completion(" 9", (21, 22))]
    student = [D.Completion(" 5", (30,)), D.Completion(" 8", (31,))]
    path = tmp_path / heldout.HELDOUT
    heldout.write_heldout(path, prompts, teacher, student)
    assert heldout.read_heldout(path) == (prompts, teacher, student)
    path.write_text(json.dumps([{"instruction": "What is 2 plus 3?"}]))          # prompts only: generate the rest
    assert heldout.read_heldout(path) == ([P.Prompt("What is 2 plus 3?")], None, None)
    for bad in ("{", "[]", '[{"input": "x"}]', '[{"instruction": "q", "teacher": {"text": "t", "ids": ["1"]}}]',
                '[{"instruction": "q", "task": "no-such-skill"}]'):
        path.write_text(bad)
        with pytest.raises(LorasuiteError, match=r"^distillation's held-out prompts .*: ") as info:
            heldout.read_heldout(path)
        assert "\n" not in str(info.value)
