"""Tests of answer parsing, the Wilson interval and batched evaluation on a tiny random Llama."""

from __future__ import annotations

import math

import pytest

from lorasuite_core.training.evaluation import (answers_match, evaluate, extract_final_number, generation_finished,
                                       truncate_generation, wilson_interval)
from lorasuite_core.training.task_data import generate_problems
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
