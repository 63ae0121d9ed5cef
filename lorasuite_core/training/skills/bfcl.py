"""Function calling from the Berkeley Function Calling Leaderboard data bundled in ``bfcl-eval``.

Data: the JSON Lines files of ``bfcl_eval/data`` (read directly; the package's runtime
dependencies are not needed): the ``simple_python`` (400 items, one function offered) and
``multiple`` (200 items, 2-4 functions offered) categories, one user turn and one expected call
each, with BFCL's possible-answer sets (``possible_answer/*.json``).

Splits: the 600 item ids are shuffled once with ``random.Random("bfcl-partition")`` and cut into
test (the first 200), validation (the next 60) and train (the remaining 340), so the splits are
disjoint and fixed; the run's seed only orders a split (``samples(split, n, seed)``: the first
``n`` of the split shuffled with ``random.Random("{split}:{seed}")``).

A sample: the instruction asks for one call in Python syntax and holds the request; the input is
the offered functions as compact JSON; the target output is the call, written from the first
possible value of each parameter (an optional parameter whose first possible value is ``""`` --
may be left out -- is left out; a required one takes its first other value), e.g. ``calculate_triangle_area(base=10, height=5, unit='units')``.

Scoring re-implements BFCL's AST checker for one call (``simple_function_checker``; BFCL's own
module cannot be imported without its model-provider clients): the first line of the generation
that parses (``ast``, literal arguments only, ``ast.literal_eval``) as ``name(key=value, ...)``
is the call; it is right iff the name is the expected one, every parameter the function requires
is given, every given parameter is an expected one, every parameter left out may be (``""`` among
its possible values), and every value is one of the possible values -- strings compared after
BFCL's ``standardize_string`` (lowercase; spaces and ``,./-_*^`` removed), lists element-wise the
same way, dicts key by key, numbers numerically (an int is accepted for a float), booleans only as
booleans.  Agreement with a teacher (:meth:`FunctionCallingSkill.agrees`) runs the same check with
the teacher's call as the only possible answer: the same name and parameters, each value the same
after the normalisation above.
"""
from __future__ import annotations

import ast
import json
import random
import re
from functools import cached_property
from typing import Any

from lorasuite_core.training.skills.base import Skill, check_split, cut_at_stop_marker, stop_markers
from lorasuite_core.training.task_data import Sample

CATEGORIES = ("simple_python", "multiple")
SPLIT_SIZES = {"test": 200, "validation": 60}  # train: the rest
INSTRUCTION = ("Answer the request with one call of one of the functions given in the input, in Python syntax "
               "with keyword arguments: function_name(argument=value, ...). Reply with the call only.\n\n"
               "Request: {request}")
_UNSET = ""


def _data_dir():
    from importlib.resources import files

    try:
        return files("bfcl_eval") / "data"
    except ModuleNotFoundError:
        raise ValueError("task bfcl reads the BFCL data of the bfcl-eval package, which is not installed: "
                         "pip install --no-deps bfcl-eval==2026.3.23 (scripts/bootstrap.sh does)") from None


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def standardize_string(text: str) -> str:
    """BFCL's string normalisation."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return standardize_string(value)
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _same(value: Any, option: Any) -> bool:
    if isinstance(option, bool) or isinstance(value, bool):
        return isinstance(option, bool) and isinstance(value, bool) and value == option
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(option)
    if isinstance(option, dict):
        return isinstance(value, dict) and _dict_matches(value, option)
    return _norm(value) == _norm(option)


def _dict_matches(value: dict, option: dict) -> bool:
    """A dict argument against one possible dict (each key's value a list of possible values)."""
    if any(key not in option for key in value):
        return False
    if any(key not in value and _UNSET not in choices for key, choices in option.items()):
        return False
    return all(any(_same(v, c) for c in _choices(option[key])) for key, v in value.items())


def _choices(possible: Any) -> list:
    return possible if isinstance(possible, list) else [possible]


def value_matches(value: Any, possible: list) -> bool:
    return any(_same(value, option) for option in possible if not (isinstance(option, str) and option == _UNSET)) \
        or (isinstance(value, str) and value == _UNSET and _UNSET in possible)


def call_matches(call: tuple[str, dict[str, Any]] | None, expected: dict[str, dict[str, list]],
                 functions: list[dict]) -> bool:
    """BFCL's one-call check (see the module docstring)."""
    if call is None:
        return False
    name, arguments = call
    if name not in expected:
        return False
    possible = expected[name]
    doc = next((f for f in functions if f["name"] == name), None)
    required = doc["parameters"].get("required", []) if doc else []
    if any(param not in arguments for param in required):
        return False
    if any(param not in possible for param in arguments):
        return False
    if any(param not in arguments and _UNSET not in choices for param, choices in possible.items()):
        return False
    return all(value_matches(value, possible[param]) for param, value in arguments.items())


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def parse_call(line: str) -> tuple[str, dict[str, Any]] | None:
    """``name(key=literal, ...)`` -> ``(name, {key: value})``; None for anything else."""
    try:
        tree = ast.parse(line.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    node = tree.body
    if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
        return None
    name = _dotted(node.func)
    if name is None:
        return None
    try:
        return name, {k.arg: ast.literal_eval(k.value) for k in node.keywords}  # type: ignore[misc]
    except (ValueError, SyntaxError, TypeError, RecursionError):
        return None


def first_call(generation: str) -> tuple[str | None, tuple[str, dict[str, Any]] | None]:
    """The first line (code fences skipped) that parses as a call, with its parse; ``(None, None)`` if none."""
    for line in cut_at_stop_marker(generation).splitlines():
        call = parse_call(line.strip().strip("`"))
        if call is not None:
            return line.strip().strip("`"), call
    return None, None


def _first_value(possible: Any) -> Any:
    """The first possible value, dicts chosen key by key (keys whose first choice is "" left out)."""
    value = next((v for v in _choices(possible)), _UNSET)
    if isinstance(value, dict):
        return {k: _first_value(v) for k, v in value.items() if _choices(v) and _choices(v)[0] != _UNSET}
    return value


def render_call(expected: dict[str, dict[str, list]], required: list[str]) -> str:
    """The target call: each parameter's first possible value; an optional one whose first is "" left out
    (a required one takes its first other value)."""
    (name, params), = expected.items()
    arguments = []
    for key, choices in params.items():
        options = [c for c in _choices(choices) if not (key in required and c == _UNSET)]
        if options and options[0] != _UNSET:
            arguments.append(f"{key}={_first_value(options)!r}")
    return f"{name}({', '.join(arguments)})"


def _compact(function: dict) -> dict:
    parameters = function.get("parameters", {})
    return {"name": function["name"], "description": function.get("description", ""),
            "parameters": {"properties": parameters.get("properties", {}), "required": parameters.get("required", [])}}


class FunctionCallingSkill(Skill):
    max_new_tokens = 96

    @cached_property
    def data_version(self) -> str:  # type: ignore[override]
        from importlib.metadata import version

        return f"bfcl-eval {version('bfcl-eval')}"

    @cached_property
    def _items(self) -> dict[str, dict]:
        data = _data_dir()
        items: dict[str, dict] = {}
        for category in CATEGORIES:
            answers = {r["id"]: r["ground_truth"] for r in _read_jsonl(data / "possible_answer" / f"BFCL_v4_{category}.json")}
            for record in _read_jsonl(data / f"BFCL_v4_{category}.json"):
                items[record["id"]] = {**record, "ground_truth": answers[record["id"]]}
        return items

    @cached_property
    def _partition(self) -> dict[str, list[str]]:
        ids = sorted(self._items)
        random.Random("bfcl-partition").shuffle(ids)
        test_end = SPLIT_SIZES["test"]
        validation_end = test_end + SPLIT_SIZES["validation"]
        return {"test": ids[:test_end], "validation": ids[test_end:validation_end], "train": ids[validation_end:]}

    def split_size(self, split: str) -> int | None:
        check_split(split)
        return len(self._partition[split])

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        self._check_count(split, n)
        ids = list(self._partition[split])
        random.Random(f"{split}:{seed}").shuffle(ids)
        return [self._make(self._items[i]) for i in ids[:n]]

    def _make(self, item: dict) -> Sample:
        request = " ".join(turn["content"] for turn in item["question"][0] if turn["role"] == "user")
        expected = item["ground_truth"][0]
        functions = [_compact(f) for f in item["function"]]
        (name, _), = expected.items()
        doc = next((f for f in functions if f["name"] == name), {"parameters": {}})
        call = render_call(expected, doc["parameters"].get("required", []))
        return self._sample(INSTRUCTION.format(request=request), call, output=call,
                            input=json.dumps(functions, ensure_ascii=False, separators=(",", ":")),
                            meta={"id": item["id"], "expected": expected, "functions": functions})

    def predicted(self, generation: str) -> str | None:
        return first_call(generation)[0]

    def is_correct(self, answer: str | None, sample: Sample) -> bool:
        meta = sample.meta or {}
        if "expected" not in meta:
            return answer is not None and answer.strip() == sample.answer.strip()
        return call_matches(parse_call(answer or ""), meta["expected"], meta["functions"])

    def target_text(self, generation: str) -> str:
        """Up to the end of the first line that parses as a call (else up to a stop marker)."""
        text = cut_at_stop_marker(generation)
        at = 0
        for line in text.split("\n"):
            at += len(line) + 1
            if parse_call(line.strip().strip("`")) is not None:
                return text[:at - 1].rstrip()
        return text.rstrip()

    def agrees(self, student: str, teacher: str) -> bool:
        """BFCL's check of the student's first call with the teacher's first call as the only possible answer."""
        _, call = first_call(teacher)
        if call is None:
            return super().agrees(student, teacher)
        name, arguments = call
        return call_matches(first_call(student)[1], {name: {k: [v] for k, v in arguments.items()}}, [])

    def finished(self, text: str) -> bool:
        """A stop marker, or a complete line (newline after it) that parses as a call."""
        if any(marker in text for marker in stop_markers()):
            return True
        lines = text.split("\n")[:-1]   # complete lines only
        return any(parse_call(line.strip().strip("`")) is not None for line in lines)
