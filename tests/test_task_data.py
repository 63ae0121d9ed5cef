"""Tests of the word-problem generator, prompt formatting and math_10k loading (no network, no model)."""

from __future__ import annotations

import json
import operator
import re
from fractions import Fraction

import pytest

from lorasuite_core.training.task_data import (TEST_TEMPLATES, TRAIN_TEMPLATES, Sample, format_prompt, format_training_text,
                                      generate_problems, load_math10k, records_to_samples, save_jsonl)

PY_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")


def test_generation_is_deterministic_by_seed():
    first = [s.to_record() for s in generate_problems(50, "train", seed=7)]
    again = [s.to_record() for s in generate_problems(50, "train", seed=7)]
    other = [s.to_record() for s in generate_problems(50, "train", seed=8)]
    assert first == again
    assert first != other


def test_split_and_seed_streams_differ_and_counts_are_exact():
    assert len(generate_problems(0, "test", 0)) == 0
    assert len(generate_problems(37, "test", 0)) == 37
    train = {s.instruction for s in generate_problems(40, "train", 0)}
    test = {s.instruction for s in generate_problems(40, "test", 0)}
    assert not train & test


def test_template_sets_are_large_enough_and_disjoint():
    assert len(TRAIN_TEMPLATES) >= 12 and len(TEST_TEMPLATES) >= 6
    assert not {t.id for t in TRAIN_TEMPLATES} & {t.id for t in TEST_TEMPLATES}
    assert not {t.question for t in TRAIN_TEMPLATES} & {t.question for t in TEST_TEMPLATES}
    used_train = {s.meta["template"] for s in generate_problems(200, "train", 1)}
    used_test = {s.meta["template"] for s in generate_problems(200, "test", 1)}
    assert used_train == {t.id for t in TRAIN_TEMPLATES}
    assert used_test == {t.id for t in TEST_TEMPLATES}


def test_all_four_operations_and_one_or_two_steps_occur():
    samples = generate_problems(300, "train", 2) + generate_problems(300, "test", 2)
    ops = {step[1] for s in samples for step in s.meta["steps"]}
    assert ops == {"+", "-", "*", "/"}
    assert {len(s.meta["steps"]) for s in samples} == {1, 2}


def _recompute(meta: dict) -> Fraction:
    env = {k: Fraction(v) for k, v in meta["values"].items()}
    value = Fraction(0)
    for index, (left, op, right) in enumerate(meta["steps"], start=1):
        value = PY_OPS[op](env[left], env[right])
        env[f"r{index}"] = value
    return value


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_correct_integers(split):
    for sample in generate_problems(300, split, seed=3):
        value = _recompute(sample.meta)
        assert value.denominator == 1 and value >= 0, sample
        assert sample.answer == str(int(value))
        for number in sample.meta["values"].values():
            assert re.search(rf"(?<!\d){number}(?!\d)", sample.instruction), (number, sample.instruction)


@pytest.mark.parametrize("split", ["train", "test"])
def test_worked_solution_equations_hold_and_end_with_answer(split):
    for sample in generate_problems(200, split, seed=4):
        equations = EQUATION.findall(sample.output)
        assert len(equations) == len(sample.meta["steps"])
        for left, op, right, result in equations:
            assert PY_OPS[op](Fraction(left), Fraction(right)) == Fraction(result), sample.output
        assert equations[-1][3] == sample.answer
        assert sample.output.endswith(f"The answer is {sample.answer}.")


def test_prompt_formats():
    sample = Sample(instruction="What is 2 + 3?", input="", output="2 + 3 = 5. The answer is 5.", answer="5")
    prompt = format_prompt(sample)
    assert prompt.endswith("### Response:\n") and "### Input" not in prompt
    assert "What is 2 + 3?" in prompt
    assert format_training_text(sample) == prompt + sample.output
    with_input = Sample(instruction="Add.", input="2 and 3", output="5", answer="5")
    assert "### Input:\n2 and 3\n\n### Response:\n" in format_prompt(with_input)


def _records():
    return [s.to_record() for s in generate_problems(5, "train", 0)]


def test_load_json_list(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(_records()))
    loaded = load_math10k(path, cache_dir=str(tmp_path / "hf"))
    assert [s.to_record() for s in loaded] == _records()


def test_load_jsonl_and_roundtrip(tmp_path):
    path = save_jsonl(generate_problems(5, "train", 0), tmp_path / "math.jsonl")
    loaded = load_math10k(str(path), limit=3, cache_dir=str(tmp_path / "hf"))
    assert [s.to_record() for s in loaded] == _records()[:3]


def test_load_numeric_answers_and_missing_input(tmp_path):
    rows = [{"instruction": "q", "output": "The answer is 12.", "answer": 12.0},
            {"instruction": "r", "output": "The answer is 2.5.", "answer": 2.5}]
    path = tmp_path / "numeric.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_math10k(path, cache_dir=str(tmp_path / "hf"))
    assert [s.answer for s in loaded] == ["12", "2.5"]
    assert [s.input for s in loaded] == ["", ""]


def test_missing_field_names_field_and_row(tmp_path):
    rows = _records()
    del rows[2]["answer"]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"row 2 is missing required field 'answer'"):
        load_math10k(path, cache_dir=str(tmp_path / "hf"))


def test_missing_column_everywhere(tmp_path):
    path = tmp_path / "noout.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "answer": "1"}]))
    with pytest.raises(ValueError, match=r"missing required field 'output'"):
        load_math10k(path, cache_dir=str(tmp_path / "hf"))


def test_records_validation_and_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 is missing required field 'instruction'"):
        records_to_samples([{"instruction": "a", "output": "b", "answer": "1"}, {"output": "b", "answer": "1"}])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_math10k(tmp_path / "absent.json")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.json or \.jsonl"):
        load_math10k(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="split must be"):
        generate_problems(3, "dev", 0)  # type: ignore[arg-type]


def test_load_from_fsspec_memory_uri(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/lorasuite-test/math.jsonl", "w") as handle:
        handle.write("\n".join(json.dumps(r) for r in _records()))
    try:
        loaded = load_math10k("memory://lorasuite-test/math.jsonl", cache_dir=str(tmp_path / "hf"))
    finally:
        fs.rm("/lorasuite-test", recursive=True)
    assert [s.to_record() for s in loaded] == _records()


def test_load_from_s3_with_storage_options(tmp_path):
    """s3:// through fsspec/s3fs against an in-process moto server (localhost only)."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        fs.call_s3("create_bucket", Bucket="lorasuite-data")
        fs.pipe("lorasuite-data/math_10k.json", json.dumps(_records()).encode())
        loaded = load_math10k("s3://lorasuite-data/math_10k.json", storage_options=options,
                              cache_dir=str(tmp_path / "hf"))
    finally:
        server.stop()
    assert [s.to_record() for s in loaded] == _records()
