"""The teacher's self-consistency filter (``--lft-consistency K``): the agreement share against hand-computed cases,
the sampler's distribution and reproducibility, and the teacher stage keeping exactly the prompts whose samples agree
with the greedy answer -- the entry's targets, its facts, its key, the failure when nothing is left, and a filter
that keeps everything publishing the adapter of an unfiltered run.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.pipeline import pair_stages
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions, add_arguments, from_arguments
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import upgrade_model_dir
from lorasuite_core.training import consistency as C
from lorasuite_core.training import evaluation as E
from lorasuite_core.training.evaluation import load_for_generation
from lorasuite_core.training.heldout import HELDOUT, TEACHER_TARGETS, read_heldout
from lorasuite_core.training.prompts import Prompt
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import EXACT

SMALL = AnalysisOptions(max_calibration_tokens=256)


def test_consistency_is_the_share_of_samples_giving_the_greedy_answer():
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    greedy = ["so the answer is 4.", "The answer is 7.", "no number here"]
    samples = [["The answer is 4.", "4", "The answer is 5."],          # 2 of 3 end on 4
               ["The answer is 7.0", "7", "The answer is 7.", "8"],   # 3 of 4 (numeric comparison)
               ["no number  here", "something else"]]                 # text compared, whitespace collapsed
    assert C.consistency(greedy, samples, prompts) == pytest.approx([2 / 3, 3 / 4, 1 / 2])
    with pytest.raises(ValueError, match="2 greedy answers, 3 sample lists"):
        C.consistency(greedy[:2], samples, prompts)


def test_sampler_draws_from_the_tempered_softmax_reproducibly():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(20000, 1)     # p = (1/4, 3/4) at T = 1
    drawn = C.sampler(1.0, seed=5)(logits)
    assert drawn.shape == (20000,) and abs(drawn.float().mean().item() - 0.75) < 0.015
    sharp = C.sampler(0.5, seed=5)(logits)                              # T = 1/2: p ∝ (1, 9) -> 0.9
    assert abs(sharp.float().mean().item() - 0.9) < 0.012
    assert torch.equal(C.sampler(1.0, seed=5)(logits), drawn)           # same seed, same draws
    assert not torch.equal(C.sampler(1.0, seed=6)(logits), drawn)
    with pytest.raises(ValueError, match="temperature"):
        C.sampler(0.0, seed=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", EXACT)
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=41)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(s.instruction for s in generate_problems(6, "train", seed=2)) + "\n")
    yield {"root": root, "old": old, "new": new, "adapter": adapter, "prompts": prompts}
    pair_stages.clear_memo()


def test_sampled_completions_give_k_per_prompt_and_repeat_with_the_seed(pair):
    model, tokenizer = load_for_generation(pair["old"], pair["adapter"], dtype="float32", device="cpu")
    prompts = [Prompt(s.instruction) for s in generate_problems(3, "train", seed=4)]
    first = C.sampled_completions(model, tokenizer, prompts, 3, seed=1)
    assert [len(row) for row in first] == [3, 3, 3]
    assert first == C.sampled_completions(model, tokenizer, prompts, 3, seed=1)
    assert first != C.sampled_completions(model, tokenizer, prompts, 3, seed=2)


def options(pair, **extra) -> MigrationOptions:
    return MigrationOptions(lft_mode="distill", lft_prompts=str(pair["prompts"]), lft_samples=4, lft_lr=1e-5,
                            gate_prompts=1, fidelity=False, **extra).check_single()


def migrate(pair, name: str, opts: MigrationOptions) -> tuple[EntryRun, StageStore]:
    store = StageStore.at(str(pair["root"] / f"store-{name}"))
    entry = EntryRun(name=name, adapter=str(pair["adapter"]), output=str(pair["root"] / "out" / name), options=opts)
    Runner(InProcess(), store.root).run(str(pair["old"]), str(pair["new"]), SMALL, [entry])
    return entry, store


def teacher_entry(store: StageStore) -> Path:
    [found] = list((Path(store.root) / "teacher").iterdir())
    return found


def test_the_stage_keeps_the_prompts_whose_samples_agree(pair, monkeypatch):
    seen = {}

    def scored(greedy, samples, prompts):
        seen.update(k=[len(s) for s in samples], n=len(prompts))
        return [1.0, 0.25, 0.5, 0.0]                   # kept: the first and the third (>= 1/2)
    monkeypatch.setattr(C, "consistency", scored)
    _, plain = migrate(pair, "plain", options(pair))
    loads, original = [], E.load_adapters_for_generation
    monkeypatch.setattr(E, "load_adapters_for_generation",
                        lambda model_dir, *a, **kw: loads.append(str(model_dir)) or original(model_dir, *a, **kw))
    entry, store = migrate(pair, "filtered", options(pair, lft_consistency=3))
    assert entry.status == "published", entry.error
    assert seen == {"k": [3, 3, 3, 3], "n": 4}
    assert loads == [str(pair["old"])]               # greedy answers and samples: one load of the old base
    all_prompts, all_targets, _ = read_heldout(teacher_entry(plain) / TEACHER_TARGETS)
    kept, targets, _ = read_heldout(teacher_entry(store) / TEACHER_TARGETS)
    assert [p.text for p in kept] == [all_prompts[0].text, all_prompts[2].text]
    assert [t.ids for t in targets] == [all_targets[0].ids, all_targets[2].ids]
    held, _, _ = read_heldout(teacher_entry(store) / HELDOUT)          # held out: never filtered
    assert [p.text for p in held] == [p.text for p in read_heldout(teacher_entry(plain) / HELDOUT)[0]]
    facts = store.facts(str(teacher_entry(store)))
    assert facts["consistency"] == {"k": 3, "temperature": C.TEMPERATURE, "min_agreement": C.MIN_AGREEMENT,
                                    "kept": 2, "dropped": 2, "mean_agreement": 0.4375}
    assert facts["n_train"] == 2
    report = json.loads((Path(entry.output) / "migration_report.json").read_text())
    assert report["light_finetune"]["consistency"]["kept"] == 2      # the report says what the filter did
    assert teacher_entry(store).name != teacher_entry(plain).name     # its own key


def test_a_filter_that_keeps_everything_publishes_the_unfiltered_adapter(pair, monkeypatch):
    monkeypatch.setattr(C, "sampler", lambda temperature, seed: (lambda logits: logits.argmax(-1)))   # T -> 0
    plain, _ = migrate(pair, "plain-2", options(pair))
    kept, store = migrate(pair, "argmax", options(pair, lft_consistency=2))
    assert store.facts(str(teacher_entry(store)))["consistency"]["dropped"] == 0
    a = load_file(f"{plain.output}/adapter_model.safetensors")
    b = load_file(f"{kept.output}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_left_to_distil_is_one_error(pair, monkeypatch):
    monkeypatch.setattr(C, "consistency", lambda greedy, samples, prompts: [0.0] * len(prompts))
    store = StageStore.at(str(pair["root"] / "store-none"))
    entry = EntryRun(name="none", adapter=str(pair["adapter"]), output=str(pair["root"] / "out" / "none"),
                     options=options(pair, lft_consistency=2))
    Runner(InProcess(), store.root).run(str(pair["old"]), str(pair["new"]), SMALL, [entry])
    assert entry.status != "published"
    assert "self-consistency filter (--lft-consistency 2)" in str(entry.error) and "\n" not in str(entry.error)
    assert not (pair["root"] / "out" / "none").exists()


def test_the_flag_is_in_the_one_schema_and_needs_distillation():
    parser = argparse.ArgumentParser()
    add_arguments(parser, MigrationOptions)
    parsed = from_arguments(parser.parse_args(["--route", "distill", "--lft-consistency", "4"]), MigrationOptions)
    assert parsed.lft_consistency == 4 and MigrationOptions().lft_consistency is None
    with pytest.raises(ValueError, match="needs lft_mode distill"):
        MigrationOptions(lft_consistency=4)
    with pytest.raises(ValueError):
        MigrationOptions(lft_mode="distill", lft_consistency=1)
