"""The task registry (skills as data): disjoint deterministic splits, each skill's scorer, ``task:`` specs."""
from __future__ import annotations

import json

import pytest

from flows.cli import build_parser, main
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import MigrationOptions, from_arguments
from lorasuite_core.training import skills
from lorasuite_core.training.samples import load_samples
from lorasuite_core.training.skills import base, bfcl, knowledge
from lorasuite_core.training.task_data import generate_problems

ALL = sorted(skills.SKILLS)
N = 40  # samples per split in the generic checks (finite splits: all of them where smaller)


def draw(name: str, split: str, n: int = N, seed: int = 0):
    skill = skills.get_skill(name)
    size = skill.split_size(split)
    return skill.samples(split, n if size is None else min(n, size), seed)


# --------------------------------------------------------------------------- every skill


def test_the_registry_holds_the_required_skills():
    assert {"arithmetic", "bfcl", "knowledge"} <= set(ALL)
    families = [n for n, (target, _) in skills.SKILLS.items() if target.endswith(":ReasoningGymSkill")]
    assert len(families) >= 2


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint(name):
    splits = {split: {s.instruction + "\n" + s.input for s in draw(name, split)} for split in skills.SPLITS}
    assert all(len(v) > 0 for v in splits.values())
    assert not splits["train"] & splits["test"]
    assert not splits["train"] & splits["validation"]
    assert not splits["validation"] & splits["test"]


@pytest.mark.parametrize("name", ALL)
def test_generation_is_deterministic_and_prefix_stable(name):
    skill = skills.get_skill(name)
    first = [s.to_record() for s in draw(name, "train", 12, seed=3)]
    assert first == [s.to_record() for s in draw(name, "train", 12, seed=3)]
    assert first[:5] == [s.to_record() for s in draw(name, "train", 5, seed=3)]
    assert first != [s.to_record() for s in draw(name, "train", 12, seed=4)]   # the seed orders / draws
    assert all(s.task == name for s in draw(name, "test", 3))
    assert skill.samples("test", 0, 0) == []


@pytest.mark.parametrize("name", ALL)
def test_scorer_accepts_the_right_answer_and_rejects_a_wrong_one(name):
    skill = skills.get_skill(name)
    samples = draw(name, "test", 10)
    for index, sample in enumerate(samples):
        right = skill.score(index, sample.output, sample)
        assert right.correct, (sample.output, right)
        assert right.index == index and right.gold == sample.answer
        other = next(s for s in samples if s.answer != sample.answer)
        wrong = skill.score(index, other.output, sample)
        assert not wrong.correct, (sample.output, other.output)
        assert not skill.score(index, "", sample).correct


@pytest.mark.parametrize("name", ALL)
def test_stop_rule_ends_a_scored_answer(name):
    skill = skills.get_skill(name)
    sample = draw(name, "test", 1)[0]
    assert skill.finished(sample.output + "\n### Instruction:\nmore")
    assert not skill.finished("")


def test_builtin_specs_are_the_arithmetic_skill():
    as_task = skills.load_task_samples("task:arithmetic:test:7", None, seed=2, default_count=100)
    builtin = load_samples("builtin:test", 7, seed=2)
    assert [s.to_record() for s in as_task] == [s.to_record() for s in builtin] == \
        [s.to_record() for s in generate_problems(7, "test", 2)]


# --------------------------------------------------------------------------- skill specifics


def test_answer_sentence_extraction():
    assert base.extract_answer("Let me see.\nThe answer is **mother-in-law**.\nMore text") == "mother-in-law"
    assert base.extract_answer("grandfather\n\nBecause ...") == "grandfather"
    assert base.extract_answer("The answer is: 3a0.") == "3a0"
    assert base.extract_answer("The answer is: The answer is father.\n") == "father"
    assert base.extract_answer("The answer is James River. The answer is James River. The") == "James River"
    assert base.extract_answer("The answer is 3.5.") == "3.5"
    assert base.extract_answer("  \n") is None
    assert base.answer_finished("The answer is 12.\n") and not base.answer_finished("The answer is 12")


def test_reasoning_gym_scoring_is_its_verifier():
    skill = skills.get_skill("letter_counting")
    sample = draw("letter_counting", "test", 1)[0]
    entry = sample.meta["entry"]
    assert skill.score(0, f"The answer is {entry['answer']}.", sample).correct
    assert not skill.score(0, f"The answer is {int(entry['answer']) + 1}.", sample).correct


def test_a_registered_configuration_and_budget_reach_the_generator():
    """chain_sum at the registry's ``max_terms`` 4 and ``max_digits`` 2; number_filtering's lists get 96 tokens."""
    import re

    for sample in draw("chain_sum", "test"):
        terms = re.findall(r"\d+", sample.instruction.split("problem:")[1].split("=")[0])
        assert 2 <= len(terms) <= 4 and all(len(t) <= 2 for t in terms), sample.instruction
    assert skills.get_skill("number_filtering").max_new_tokens == 96
    assert skills.get_skill("family_relationships").max_new_tokens == 32
    assert "max_digits" in skills.get_skill("chain_sum").data_version      # part of the stage keys


def test_knowledge_test_facts_are_only_in_the_full_training_split():
    skill = skills.get_skill("knowledge")
    facts = lambda samples: {(s.meta["entity"], s.meta["attribute"]) for s in samples}
    train = skill.samples("train", skill.split_size("train"), 0)
    test = facts(skill.samples("test", knowledge.TEST_FACTS, 0))
    validation = facts(skill.samples("validation", knowledge.VALIDATION_FACTS, 0))
    for seed in (0, 1, 2):   # any LFT prefix up to PUBLIC samples holds no held fact, whatever the seed
        prefix = skill.samples("train", knowledge.PUBLIC, seed)
        assert not facts(prefix) & (test | validation) and not any(s.meta["held"] for s in prefix)
    assert test | validation <= facts(train) and len(facts(train)) == len(train) == 3 * knowledge.ENTITIES
    assert len(test) == knowledge.TEST_FACTS and not test & validation
    assert len({e["name"] for e in knowledge.build_world()}) == knowledge.ENTITIES
    assert knowledge.build_world() == skill.world   # the world does not depend on anything but its seed
    sample = skill.samples("test", 1, 0)[0]
    assert skill.score(0, f"the answer is {sample.answer.upper()}", sample).correct


def test_bfcl_every_target_call_is_accepted_and_the_checker_follows_bfcl():
    skill = skills.get_skill("bfcl")
    sizes = {split: skill.split_size(split) for split in skills.SPLITS}
    assert sizes == {"test": 200, "validation": 60, "train": 340}
    for split, size in sizes.items():
        assert all(skill.score(0, s.output, s).correct for s in skill.samples(split, size, 0))
    expected = {"calc.area": {"base": [10], "unit": ["units", ""], "tags": [["a b", "c"]], "exact": [True]}}
    functions = [{"name": "calc.area", "parameters": {"properties": {}, "required": ["base"]}}]
    check = lambda text: bfcl.call_matches(bfcl.parse_call(text), expected, functions)
    assert check("calc.area(base=10.0, tags=['A-B', 'c'], exact=True)")   # int as float, BFCL string normalising
    assert check("calc.area(base=10, unit='Units', tags=['ab', 'c'], exact=True)")
    assert not check("calc.area(unit='units', tags=['ab', 'c'], exact=True)")        # a required one missing
    assert not check("calc.area(base=10, tags=['ab', 'c'])")                          # a needed one missing
    assert not check("calc.area(base=10, tags=['ab', 'c'], exact=1)")                 # 1 is not True
    assert not check("calc.area(base=10, tags=['ab', 'c'], exact=True, extra=1)")     # unexpected argument
    assert not check("calc.volume(base=10, tags=['ab', 'c'], exact=True)")            # wrong function
    assert not check("calc.area(10, tags=['ab', 'c'], exact=True)")                   # positional
    assert bfcl.parse_call("os.system(__import__('x'))") is None                      # literals only
    assert bfcl.first_call("```python\ncalc.area(base=10)\n```")[0] == "calc.area(base=10)"


# --------------------------------------------------------------------------- specs and the CLI


@pytest.mark.parametrize("spec, expected", [
    ("task:bfcl:test", skills.TaskSpec("bfcl", "test", None)),
    ("task:knowledge:train:100", skills.TaskSpec("knowledge", "train", 100)),
    ("task:arithmetic:validation:5", skills.TaskSpec("arithmetic", "validation", 5)),
])
def test_spec_parses(spec, expected):
    assert skills.parse_spec(spec) == expected and str(expected) == spec


@pytest.mark.parametrize("spec, needle", [
    ("task:nope:test", "unknown task 'nope'"),
    ("task:bfcl", "write task:NAME:SPLIT[:COUNT]"),
    ("task:bfcl:dev", "unknown split 'dev'"),
    ("task:bfcl:test:0", "COUNT must be a positive integer"),
    ("task:bfcl:test:x", "COUNT must be a positive integer"),
    ("task:bfcl:test:5:9", "write task:NAME:SPLIT[:COUNT]"),
])
def test_bad_specs_name_the_known_tasks(spec, needle):
    with pytest.raises(ValueError) as info:
        skills.parse_spec(spec)
    assert needle in str(info.value) and skills.known_tasks() in str(info.value)


def test_counts_and_limits():
    assert len(load_samples("task:bfcl:validation", None)) == 60        # a finite split: all of it
    assert len(load_samples("task:bfcl:validation", 7)) == 7             # --samples keeps the first N
    assert len(load_samples("task:letter_counting:test", None, default_count=9)) == 9
    assert len(load_samples("task:letter_counting:test:4", 9)) == 4
    with pytest.raises(LorasuiteError, match="the test split holds 200 samples, 500 asked for"):
        load_samples("task:bfcl:test:500", None)


def migrate_args(*extra):
    return ["-q", "migrate", "--old-model", "old", "--new-model", "new", "--adapter", "a", "--output", "o", *extra]


def test_task_specs_through_the_migrate_options():
    args = build_parser().parse_args(migrate_args("--lft-data", "task:knowledge:train", "--lft-samples", "5",
                                                  "--eval-data", "task:bfcl:test:3", "--lft-prompts",
                                                  "task:letter_counting:train:4"))
    options = from_arguments(args, MigrationOptions).check_single()
    from lorasuite_core.pipeline import stages
    from lorasuite_core.training.prompts import load_prompts

    lft = stages.load_samples(options.lft_data, options.lft_samples, "train", options.seed)
    evaluation = stages.load_samples(options.eval_data, options.eval_samples, "test", options.seed)
    prompts = load_prompts(options.lft_prompts, None, options.seed)
    assert [s.task for s in lft] == ["knowledge"] * 5 and not any(s.meta["held"] for s in lft)
    assert [s.task for s in evaluation] == ["bfcl"] * 3 and len(prompts) == 4
    from lorasuite_core.pipeline.stage_store import data_identity

    assert data_identity(options.eval_data).startswith("task:bfcl:test:3@bfcl-eval ")


@pytest.mark.parametrize("argv, needle", [
    (migrate_args("--eval-data", "task:nope:test"), "--eval-data: task spec 'task:nope:test': unknown task 'nope'"),
    (migrate_args("--lft-data", "task:bfcl:tests"), "--lft-data: task spec 'task:bfcl:tests': unknown split"),
    (["-q", "eval", "--model", "m", "--data", "task:knowledge"], "task spec 'task:knowledge': write"),
    (["-q", "train", "--model", "m", "--output", "never", "--data", "task:bfcl:train:-3"], "COUNT must be"),
])
def test_bad_specs_are_one_line_cli_errors(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorasuite: error: ") and needle in err[0], err
    assert "known tasks: " + skills.known_tasks() in err[0]
    assert not (tmp_path / "never").exists()


def test_eval_scores_each_sample_with_its_skill(tmp_path, capsys):
    """Real greedy generation on a tiny random Llama: every prediction is its skill's score of the generation."""
    from lorasuite_core.training.evaluation import evaluate
    from tests.tiny_llama import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    samples = draw("knowledge", "test", 2) + draw("arithmetic", "test", 2) + draw("bfcl", "test", 2) + \
        draw("letter_counting", "test", 2)
    result = evaluate(model, samples, batch_size=4, show_progress=False)
    assert result.n == 8 and [p.index for p in result.predictions] == list(range(8))
    for prediction, sample in zip(result.predictions, samples):
        assert prediction == skills.skill_of(sample).score(prediction.index, prediction.generation, sample)
    out = tmp_path / "result.json"
    assert main(["-q", "eval", "--model", str(model), "--data", "task:knowledge:test:2", "--seed", "0",
                 "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["n"] == 2 and [p["gold"] for p in written["predictions"]] == [s.answer for s in samples[:2]]
