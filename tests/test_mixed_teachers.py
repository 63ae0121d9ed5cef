"""One base model, several teachers: PEFT mixed-adapter batches give each adapter's own greedy completions.

Three random adapters of one tiny model, each with its own prompts (and one prompt shared by all): generating all
of them in shared batches (rows of different adapters side by side, rows leaving their batch as they finish) equals
generating each adapter's prompts with that adapter alone loaded; and the adapters really differ (the check has
teeth: the same prompt gets different completions under different adapters).  In bf16 (other batch shapes round
differently) a pass per adapter on the one base load; evaluation of several adapters on one base the same way.
"""
from __future__ import annotations

import pytest

from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.task_data import generate_problems

GEN = {"max_new_tokens": 24, "batch_size": 4}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = make_tiny_model_dir("llama", root / "model", seed=2)
    adapters = {f"t{i}": make_random_lora_adapter(model, root / f"t{i}", rank=4, alpha=8, seed=20 + i)
                for i in range(3)}
    problems = P.prompts_from_samples(generate_problems(10, "train", seed=4))
    prompts = {name: [problems[0]] + problems[1 + 3 * i:4 + 3 * i] for i, name in enumerate(adapters)}
    return model, adapters, prompts


def test_mixed_adapter_batches_equal_one_adapter_at_a_time(teachers):
    model, adapters, prompts = teachers
    mixed = D.teacher_completions(model, {name: (adapters[name], prompts[name]) for name in adapters},
                                  dtype="float32", device="cpu", mixed=True, **GEN)
    for name, adapter in adapters.items():
        alone, tokenizer = D.load_for_generation(model, adapter, dtype="float32", device="cpu")
        assert mixed[name] == D.greedy_completions(alone, tokenizer, prompts[name], **GEN), name
    shared = [mixed[name][0].text for name in adapters]   # problems[0] under each adapter
    assert len(set(shared)) > 1


def test_mismatched_adapter_names_are_refused(teachers):
    model, adapters, prompts = teachers
    loaded, tokenizer = D.load_for_generation(model, adapters["t0"], dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="2 adapter names for 4 prompts"):
        D.greedy_completions(loaded, tokenizer, prompts["t0"], adapter_names=["default", "default"], **GEN)


@pytest.mark.parametrize("dtype, mixed", [("float32", True), ("float32", False), ("auto", False)])
def test_evaluating_several_adapters_on_one_base_equals_evaluating_each(teachers, dtype, mixed):
    """evaluate_adapters on one base load gives each adapter's (and the bare model's) own evaluate, predictions and
    accuracy: in float32 with every row in shared batches (mixed) or a pass per adapter (the default), in the
    evaluation dtype (bf16 where the CPU has it) with a pass per adapter."""
    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.evaluation_fleet import evaluate_adapters

    model, adapters, _ = teachers
    samples = generate_problems(5, "test", seed=8)
    rows = {**adapters, "bare": None}
    together = evaluate_adapters(model, samples, rows, batch_size=4, max_new_tokens=24, dtype=dtype, device="cpu",
                                 mixed=mixed)
    assert list(together) == list(rows)
    for name, adapter in rows.items():
        alone = evaluate(model, samples, adapter_dir=adapter, batch_size=4, max_new_tokens=24, dtype=dtype,
                         device="cpu", show_progress=False)
        assert together[name].predictions == alone.predictions, name
        assert (together[name].accuracy, together[name].n, together[name].dtype) == (alone.accuracy, 5, alone.dtype)
    assert len({tuple(p.generation for p in r.predictions) for r in together.values()}) > 1   # the rows differ


def test_unmixed_teachers_in_bf16_equal_one_adapter_at_a_time(teachers):
    """bf16 rounds differently for other batch shapes: ``mixed=False`` (one base load, a pass per adapter) gives each
    adapter the batches, and so the completions, it gets alone."""
    model, adapters, prompts = teachers
    passes = D.teacher_completions(model, {name: (adapters[name], prompts[name]) for name in adapters},
                                   dtype="bfloat16", device="cpu", mixed=False, **GEN)
    for name, adapter in adapters.items():
        alone, tokenizer = D.load_for_generation(model, adapter, dtype="bfloat16", device="cpu")
        assert passes[name] == D.greedy_completions(alone, tokenizer, prompts[name], **GEN), name
