"""Tests of answer parsing, the Wilson interval, the greedy generation loop and evaluation on a tiny random Llama."""

from __future__ import annotations

import math
import random

import pytest

import torch

from lorasuite_core.training.evaluation import (GenerationStats, _load_for_eval, answers_match, eval_dtype, evaluate,
                                               extract_final_number, generation_finished, greedy_generate,
                                               greedy_generate_ids, truncate_generation, wilson_interval)
from lorasuite_core.training.task_data import format_prompt, generate_problems
from tests.tiny_llama import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.5", "1234.5"),
    ("so 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is $12.", "12"),
    ("It costs $1,000,000 in total", "1000000"),
    ("The temperature is -5 degrees.", "-5"),
    ("5 - 3 = 2", "2"),
    ("x-3", "3"),  # a hyphen after a word is not a minus sign
    ("(2)-3", "3"),
    ("a fraction .5 of it", "0.5"),
    ("answer: 0.25.", "0.25"),
    ("1,2,3", "3"),  # list commas are not thousands separators
    ("12,34", "34"),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("7", "7", True),
    ("7.0", "7", True),
    ("7.00005", "7", True),
    ("7.001", "7", False),
    ("1234.5", "1,234.5", True),
    ("-5", "-5.0", True),
    ("5", "-5", False),
    (None, "3", False),
    ("abc", "abc", True),
])
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_truncate_generation_ignores_rambling():
    text = "2 * 3 = 6. The answer is 6. Then 7 more.\n\n### Instruction:\nWhat is 99?"
    assert truncate_generation(text) == "2 * 3 = 6. The answer is 6"
    assert extract_final_number(truncate_generation(text)) == "6"
    assert truncate_generation("4 + 4 = 8\n### Instruction: 5") == "4 + 4 = 8\n"


@pytest.mark.parametrize("text, finished", [
    ("3 + 4 = 7. The answer is", False),
    ("3 + 4 = 7. The answer is 7", False),  # "7" might still become "72"
    ("3 + 4 = 7. The answer is 7.", False),  # ... or "7.5"
    ("3 + 4 = 7. The answer is 7. ", True),
    ("The answer is 7\n", True),
    ("The answer is 1,234.5 dollars", True),
    ("The answer is 1,2", False),
    ("some text\n### Instruction", True),
    ("12 + 5 = 17", False),
])
def test_generation_finished(text, finished):
    assert generation_finished(text) is finished
    if finished and "answer" in text:  # stopping here cannot change the score
        assert extract_final_number(truncate_generation(text)) == extract_final_number(
            truncate_generation(text + "8 and more 99"))


def test_wilson_interval_matches_hand_computation():
    correct, n, z = 37, 50, 1.959963984540054
    p = correct / n  # 0.74
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = (z / (1 + z**2 / n)) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low, high = wilson_interval(correct, n)
    assert low == pytest.approx(centre - half, abs=1e-12)
    assert high == pytest.approx(centre + half, abs=1e-12)
    # by hand: centre = 0.778415 / 1.076829 = 0.722877, half = 1.820143 * sqrt(0.0042322) = 0.118409
    assert (round(low, 4), round(high, 4)) == (0.6045, 0.8413)


def test_wilson_interval_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.8415 / (10 + 3.8415), abs=1e-4)  # z^2/(n+z^2) when p=0
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + 3.8415), abs=1e-4)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct must be"):
        wilson_interval(4, 3)


def test_evaluate_tiny_model_counts_are_consistent(tiny_model_dir):
    samples = generate_problems(7, "test", seed=5)
    result = evaluate(tiny_model_dir, samples, batch_size=3, max_new_tokens=8, device="cpu", show_progress=False)
    assert result.n == 7 and len(result.predictions) == 7
    assert result.correct == sum(p.correct for p in result.predictions)
    assert result.accuracy == pytest.approx(result.correct / 7)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(result.correct, 7))
    assert [p.index for p in result.predictions] == list(range(7))
    assert [p.gold for p in result.predictions] == [s.answer for s in samples]
    assert result.seconds > 0 and result.peak_rss_mb > 0 and result.peak_cuda_mb is None


def test_evaluate_batching_does_not_change_greedy_outputs(tiny_model_dir):
    samples = generate_problems(5, "test", seed=6)
    one = evaluate(tiny_model_dir, samples, batch_size=1, max_new_tokens=6, device="cpu", show_progress=False)
    many = evaluate(tiny_model_dir, samples, batch_size=5, max_new_tokens=6, device="cpu", show_progress=False,
                    keep_predictions=True)
    assert [p.generation for p in one.predictions] == [p.generation for p in many.predictions]
    assert "predictions" not in many.to_dict()


def test_evaluate_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no evaluation samples"):
        evaluate(tiny_model_dir, [])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate(tmp_path, generate_problems(1, "test", 0))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        evaluate(tiny_model_dir, generate_problems(1, "test", 0), adapter_dir=tmp_path, device="cpu")


# --------------------------------------------------------------------------- the greedy loop


@pytest.fixture(scope="module")
def tiny_fp32(tiny_model_dir):
    return _load_for_eval(tiny_model_dir, None, "float32", "cpu")


# Short, varied prompts: the random tiny model continues each differently (full arithmetic prompts all end in
# "### Response:\n" and get nearly the same continuation), so a row mix-up or a wrong order would show.
SNIPPETS = ("12 + 5 =", "Tom had", "apples and 7 boxes", "The answer is", "How many marbles", "Lucy", "3 * 4 = 12.",
            "jars of cookies in the kitchen", "Diego gave 9", "Anna shared 24 stickers among", "so 8 / 2",
            "Omar bought 3 bags of")


def _prompts(n: int, seed: int) -> list[str]:
    snippets = list(SNIPPETS)
    random.Random(seed).shuffle(snippets)
    return snippets[:n]


def _record_batches(model):
    """Forward pre-hook recording every forward's input_ids shape (batch rows, positions)."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    return shapes, handle


def test_greedy_loop_equals_hf_generate_one_prompt_at_a_time(tiny_fp32):
    from transformers import GenerationConfig

    model, tokenizer = tiny_fp32
    prompts = _prompts(7, seed=11)
    ours = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=7, batch_size=1)
    for prompt, ids in zip(prompts, ours, strict=True):
        encoded = tokenizer(prompt, return_tensors="pt")
        config = GenerationConfig(max_new_tokens=7, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        reference = model.generate(**encoded, generation_config=config)[0, encoded["input_ids"].shape[1]:].tolist()
        assert ids == reference


def test_length_sorted_batches_match_batch_size_one_in_input_order(tiny_fp32):
    model, tokenizer = tiny_fp32
    prompts = _prompts(9, seed=12)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 2 and lengths != sorted(lengths)  # varied and not already sorted
    singles = [greedy_generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    shapes, handle = _record_batches(model)
    try:
        batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    finally:
        handle.remove()
    assert batched == singles  # results in input order, batching changes nothing
    prefill_widths = [width for rows, width in shapes if width > 1]
    by_length = sorted(lengths)
    assert prefill_widths == [max(by_length[b:b + 4]) for b in range(0, 9, 4)]  # batches of sorted prompts


def test_finished_rows_leave_the_batch(tiny_fp32):
    model, tokenizer = tiny_fp32
    prompts = _prompts(4, seed=13)
    full = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, eos_token_ids=[-1])
    assert all(len(ids) == 8 for ids in full)
    texts = [[tokenizer.decode(ids[:j], skip_special_tokens=True) for j in range(9)] for ids in full]

    def unique_stop(row: int, wanted: int) -> int:  # first length >= wanted whose text no other prefix has
        others = {t for r, row_texts in enumerate(texts) if r != row for t in row_texts}
        return next(k for k in range(wanted, 9) if texts[row][k] not in others | set(texts[row][:k]))

    stop_after = [unique_stop(row, wanted) for row, wanted in enumerate([2, 5, 3, 7])]
    assert len(set(stop_after)) >= 3 and max(stop_after) < 8  # rows finish at different steps, before the limit
    targets = {texts[row][k] for row, k in enumerate(stop_after)}
    stats = GenerationStats()
    shapes, handle = _record_batches(model)
    try:
        stopped = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, eos_token_ids=[-1],
                                      stop=lambda text: text in targets, stats=stats)
    finally:
        handle.remove()
    assert stopped == [ids[:k] for ids, k in zip(full, stop_after)]
    # prefill with 4 rows, then one decode forward per step over the rows still unfinished
    steps = max(stop_after)
    assert [rows for rows, _ in shapes] == [4] + [sum(k > step for k in stop_after) for step in range(1, steps)]
    assert stats.forward_passes == steps and stats.row_steps == sum(k - 1 for k in stop_after)
    assert stats.generated_tokens == sum(stop_after) and stats.batches == 1


def test_eos_ends_a_row_and_is_not_in_the_text(tiny_fp32):
    model, tokenizer = tiny_fp32
    prompts = _prompts(3, seed=14)
    full = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, eos_token_ids=[-1])
    fake_eos = full[1][2]  # pretend the third token of row 1 is an EOS id
    ids = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, eos_token_ids=[fake_eos])
    for row, generated in zip(full, ids, strict=True):
        cut = row.index(fake_eos) + 1 if fake_eos in row else len(row)
        assert generated == row[:cut]
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3,
                            eos_token_ids=[tokenizer.eos_token_id])
    assert all(tokenizer.eos_token not in t for t in texts)


def test_bf16_diverges_from_fp32_only_at_near_ties(tiny_model_dir, tiny_fp32):
    model32, tokenizer = tiny_fp32
    model16, _ = _load_for_eval(tiny_model_dir, None, "bfloat16", "cpu")
    assert next(model16.parameters()).dtype == torch.bfloat16
    prompts = _prompts(12, seed=15)
    ids32 = greedy_generate_ids(model32, tokenizer, prompts, max_new_tokens=8, batch_size=6, eos_token_ids=[-1])
    ids16 = greedy_generate_ids(model16, tokenizer, prompts, max_new_tokens=8, batch_size=6, eos_token_ids=[-1])
    agreeing = 0
    for prompt, a, b in zip(prompts, ids32, ids16, strict=True):
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            agreeing += 1
            continue
        context = torch.tensor([tokenizer(prompt)["input_ids"] + a[:d]])
        with torch.no_grad():
            logits = model32(input_ids=context).logits[0, -1]
        top = logits.max().item()
        # fp32's choice and bf16's differ by less than bf16's rounding of the logits (8 mantissa bits)
        assert top - logits[b[d]].item() <= 0.02 * logits.abs().max().item() + 1e-3
    assert agreeing >= 6


def test_eval_dtype_auto_follows_the_cpu(monkeypatch):
    import lorasuite_core.training.evaluation as evaluation

    cpu = torch.device("cpu")
    monkeypatch.setattr(evaluation, "cpu_supports_bf16", lambda: True)
    assert eval_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(evaluation, "cpu_supports_bf16", lambda: False)
    assert eval_dtype("auto", cpu) == "float32"
    assert eval_dtype("float32", cpu) == "float32" and eval_dtype("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        eval_dtype("int3", cpu)


def test_evaluate_reports_dtype_and_counters(tiny_model_dir):
    samples = generate_problems(5, "test", seed=16)
    result = evaluate(tiny_model_dir, samples, batch_size=2, max_new_tokens=4, dtype="bfloat16", device="cpu",
                      show_progress=False)
    assert result.dtype == "bfloat16" and result.batch_size == 2
    generation = result.to_dict()["generation"]
    assert generation["batches"] == 3 and generation["generated_tokens"] <= 5 * 4
    assert generation["prompt_tokens"] <= generation["padded_prompt_tokens"]


def test_greedy_loop_through_a_peft_adapter_equals_its_generate(tiny_model_dir, tiny_fp32, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    base, tokenizer = _load_for_eval(tiny_model_dir, None, "float32", "cpu")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    model, _ = _load_for_eval(tiny_model_dir, tmp_path / "adapter", "float32", "cpu")
    prompts = _prompts(5, seed=17)
    ours = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=5)
    plain = greedy_generate_ids(tiny_fp32[0], tokenizer, prompts, max_new_tokens=6, batch_size=5)
    assert ours != plain  # the adapter changes the continuations
    for prompt, ids in zip(prompts, ours, strict=True):
        encoded = tokenizer(prompt, return_tensors="pt")
        generation = GenerationConfig(max_new_tokens=6, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        reference = model.generate(**encoded, generation_config=generation)[0, encoded["input_ids"].shape[1]:]
        assert ids == reference.tolist()


def test_the_output_head_gets_a_contiguous_input_and_the_hook_is_removed(tiny_fp32):
    """A strided hidden[:, -1:] sent Gemma-3's head through matmul's batched path (5 GB, 4x slower)."""
    model, tokenizer = tiny_fp32
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    try:
        greedy_generate(model, tokenizer, _prompts(5, seed=3), max_new_tokens=3, batch_size=5)
    finally:
        handle.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks                 # the generation's own hook is gone again
