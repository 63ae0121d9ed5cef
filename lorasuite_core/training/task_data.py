"""Task data for LoRA training, light fine-tuning (LFT) and evaluation.

Design
------
Two sources of :class:`Sample` records, both in the *math_10k* layout used by
LLM-Adapters / LoRASuite (``instruction`` / ``input`` / ``output`` / ``answer``):

1. **A deterministic generator** of arithmetic word problems in the style of
   AddSub (one addition or subtraction), MultiArith (two chained operations) and
   SingleEq (one equation, any of + - x /).  Every problem comes from a
   :class:`Template`: a question text with placeholders, an ordered list of
   binary *steps* (``("a", "*", "b")`` computes ``r1``; ``("r1", "-", "c")``
   computes ``r2`` ...) and integer ranges for the operands.  Operands are drawn
   with a seeded :class:`random.Random` and rejected until every intermediate
   result is a non-negative integer (so divisions are always exact).  The worked
   solution is written from the same steps ("5 * 4 = 20. 20 - 3 = 17.") and
   ends with ``"The answer is N."``.  Train and test use *disjoint* template
   sets (:data:`TRAIN_TEMPLATES`, :data:`TEST_TEMPLATES`), so evaluation
   measures transfer to unseen phrasings, not memorised sentences.  The numbers
   and steps of each generated problem are kept in ``Sample.meta`` so tests (and
   curious users) can recompute the answer independently.

2. **User data** in the math_10k layout stored as JSON (a list of objects) or
   JSONL, at a local path or any fsspec URI (``s3://``, ``gs://``, ...), read
   through ``datasets.load_dataset("json", ...)`` with ``storage_options``.
   ``instruction``, ``output`` and ``answer`` are required; ``input`` is
   optional (missing -> ``""``).  A missing/empty required field raises a
   ``ValueError`` naming the field and the 0-based row.

Prompts use the Alpaca template of LLM-Adapters.  :func:`format_prompt` is the
single source of truth used by both training (its tokens are masked out of the
loss) and evaluation (generation starts right after it), so the two can never
drift apart.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
VALIDATION_GUARD = 2000  # validation problems never repeat one of the first this many train problems
REQUIRED_FIELDS = ("instruction", "output", "answer")
OPTIONAL_FIELDS = ("input",)
_MAX_DRAWS = 10_000


@dataclass(frozen=True)
class Sample:
    """One task example in the math_10k layout (``meta`` is generator-only extra info)."""

    instruction: str
    input: str
    output: str
    answer: str
    meta: dict[str, Any] | None = field(default=None, compare=False)
    task: str | None = field(default=None, compare=False)  # the registered skill that made it (scores it)

    def to_record(self) -> dict[str, str]:
        """The four math_10k fields (``meta`` dropped), ready for JSON."""
        return {"instruction": self.instruction, "input": self.input, "output": self.output, "answer": self.answer}


# --------------------------------------------------------------------------- prompts

_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(sample: Sample) -> str:
    """Alpaca-style prompt (identical in training and evaluation); ends with ``"### Response:\\n"``."""
    if sample.input.strip():
        return _PROMPT_WITH_INPUT.format(instruction=sample.instruction, input=sample.input)
    return _PROMPT_NO_INPUT.format(instruction=sample.instruction)


def format_training_text(sample: Sample) -> str:
    """Prompt followed by the target output (what the model is trained to continue with)."""
    return format_prompt(sample) + sample.output


# --------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """A word-problem template: question text, ordered arithmetic steps, operand ranges.

    ``steps`` are ``(left, op, right)`` with operands naming a variable of ``ranges``
    or an earlier result ``r1``, ``r2`` ...; the last result is the answer.
    Placeholders available in ``question``: the variables, ``{name}``, ``{name2}``,
    ``{obj}`` (plural object), ``{box}``/``{boxes}`` (container), ``{place}``.
    """

    id: str
    style: Literal["addsub", "multiarith", "singleeq"]
    question: str
    steps: tuple[tuple[str, str, str], ...]
    ranges: dict[str, tuple[int, int]]


def _t(id_: str, style: str, question: str, steps: str, **ranges: tuple[int, int]) -> Template:
    """Compact constructor: ``steps`` like ``"a+b; r1-c"`` (operators + - * /)."""
    parsed = []
    for step in steps.split(";"):
        step = step.strip()
        op = next(ch for ch in "+-*/" if ch in step)
        left, right = (s.strip() for s in step.split(op))
        parsed.append((left, op, right))
    return Template(id_, style, question, tuple(parsed), dict(ranges))  # type: ignore[arg-type]


TRAIN_TEMPLATES: tuple[Template, ...] = (
    _t("tr_gift", "addsub", "{name} has {a} {obj}. {name2} gives {name} {b} more {obj}. "
       "How many {obj} does {name} have now?", "a+b", a=(2, 60), b=(2, 40)),
    _t("tr_give_away", "addsub", "{name} had {a} {obj}. {name} gave {b} {obj} to {name2}. "
       "How many {obj} does {name} have left?", "a-b", a=(10, 90), b=(1, 40)),
    _t("tr_place_add", "addsub", "There are {a} {obj} in the {place}. {name} puts {b} more {obj} in the {place}. "
       "How many {obj} are in the {place} now?", "a+b", a=(3, 80), b=(2, 50)),
    _t("tr_picked", "addsub", "{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. "
       "How many {obj} did {name} pick in all?", "a+b", a=(2, 50), b=(2, 50)),
    _t("tr_at_first", "addsub", "After buying {b} more {obj}, {name} has {a} {obj}. "
       "How many {obj} did {name} have at first?", "a-b", a=(15, 99), b=(2, 14)),
    _t("tr_lost_found", "multiarith", "{name} had {a} {obj}. {name} lost {b} of them and then found {c} more. "
       "How many {obj} does {name} have now?", "a-b; r1+c", a=(10, 60), b=(1, 9), c=(1, 20)),
    _t("tr_boxes", "multiarith", "{name} has {a} {boxes}. Each {box} holds {b} {obj}. "
       "How many {obj} does {name} have in total?", "a*b", a=(2, 12), b=(2, 12)),
    _t("tr_share", "singleeq", "{name} wants to share {a} {obj} equally among {b} friends. "
       "How many {obj} does each friend get?", "a/b", a=(4, 120), b=(2, 10)),
    _t("tr_spend", "singleeq", "{name} buys {b} {obj} that cost {a} dollars each. "
       "How many dollars does {name} spend?", "a*b", a=(2, 15), b=(2, 9)),
    _t("tr_pack_rest", "multiarith", "{name} had {a} {obj}. {name} gave away {b} of them and packed the rest "
       "into {boxes} of {c}. How many {boxes} did {name} fill?", "a-b; r1/c", a=(12, 90), b=(1, 20), c=(2, 9)),
    _t("tr_packs_eat", "multiarith", "{name} bought {a} packs of {obj} with {b} in each pack, then used {c} of them. "
       "How many {obj} are left?", "a*b; r1-c", a=(2, 9), b=(3, 10), c=(1, 15)),
    _t("tr_times_as_many", "singleeq", "{name} has {a} {obj}. {name2} has {b} times as many {obj} as {name}. "
       "How many {obj} does {name2} have?", "a*b", a=(2, 20), b=(2, 6)),
    _t("tr_points", "addsub", "{name} scored {a} points in the first game and {b} points in the second game. "
       "How many points did {name} score altogether?", "a+b", a=(3, 40), b=(3, 40)),
    _t("tr_pages", "multiarith", "{name} read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. "
       "How many pages did {name} read in the three days?", "a+b; r1+c", a=(5, 40), b=(5, 40), c=(5, 40)),
    _t("tr_wage", "multiarith", "{name} earns {a} dollars per hour and worked {b} hours this week, then spent "
       "{c} dollars on lunch. How many dollars does {name} have left from this week's pay?", "a*b; r1-c",
       a=(5, 15), b=(2, 10), c=(3, 20)),
    _t("tr_library", "addsub", "The {place} had {a} books. {b} books were taken away. "
       "How many books are in the {place} now?", "a-b", a=(20, 99), b=(2, 19)),
)

TEST_TEMPLATES: tuple[Template, ...] = (
    _t("te_fewer", "addsub", "{name} collected {a} {obj}. {name2} collected {b} fewer {obj} than {name}. "
       "How many {obj} did {name2} collect?", "a-b", a=(12, 80), b=(1, 11)),
    _t("te_together", "addsub", "{name} has {a} {obj} and {name2} has {b} {obj}. "
       "How many {obj} do they have together?", "a+b", a=(2, 60), b=(2, 60)),
    _t("te_rows", "singleeq", "A hall has {a} rows of chairs with {b} chairs in each row. "
       "How many chairs are in the hall?", "a*b", a=(2, 12), b=(2, 12)),
    _t("te_baker", "singleeq", "A baker made {a} {obj} and put them into {boxes} of {b}. "
       "How many {boxes} did the baker fill?", "a/b", a=(6, 120), b=(2, 10)),
    _t("te_money_left", "multiarith", "{name} had {a} dollars, spent {b} dollars on a book and {c} dollars on a pen. "
       "How many dollars does {name} have left?", "a-b; r1-c", a=(30, 99), b=(2, 15), c=(1, 9)),
    _t("te_bags_extra", "multiarith", "{name} buys {a} {boxes} with {b} {obj} in each {box} and gets {c} extra {obj} "
       "for free. How many {obj} does {name} have?", "a*b; r1+c", a=(2, 9), b=(2, 10), c=(1, 9)),
    _t("te_teams", "multiarith", "{a} students are split equally into {b} teams, and then {c} more students join "
       "each team. How many students are on each team?", "a/b; r1+c", a=(8, 60), b=(2, 6), c=(1, 5)),
    _t("te_received_shared", "multiarith", "{name} had {a} {obj}, received {b} more and shared all of them equally "
       "among {c} friends. How many {obj} did each friend get?", "a+b; r1/c", a=(4, 50), b=(2, 30), c=(2, 6)),
)

NAMES = ("Tom", "Anna", "Liam", "Sofia", "Omar", "Mia", "Ravi", "Chen", "Lucy", "Diego", "Emma", "Noah",
         "Aisha", "Jack", "Yuki", "Maria", "Ben", "Zoe", "Ivan", "Nora", "Sam", "Lena", "Kofi", "Ella")
OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "seashells", "stamps", "balloons",
           "cards", "crayons", "oranges", "toy cars", "buttons", "candies", "flowers", "beads")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("crate", "crates"))
PLACES = ("classroom", "library", "shop", "garden", "kitchen", "storeroom")

_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


def templates_for(split: Split) -> tuple[Template, ...]:
    """Template set of a split ('train' or 'test'); the two sets are disjoint."""
    if split == "train":
        return TRAIN_TEMPLATES
    if split == "test":
        return TEST_TEMPLATES
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def evaluate_steps(steps: Sequence[Sequence[str]], values: dict[str, int]) -> list[Fraction]:
    """Results of each step (exact fractions); raises ZeroDivisionError on division by zero."""
    env: dict[str, Fraction] = {k: Fraction(v) for k, v in values.items()}
    results = []
    for index, (left, op, right) in enumerate(steps, start=1):
        result = _OPS[op](env[left], env[right])
        env[f"r{index}"] = result
        results.append(result)
    return results


def _results_acceptable(results: list[Fraction]) -> bool:
    return all(r.denominator == 1 and r >= 0 for r in results)


def _draw_values(template: Template, rng: random.Random) -> tuple[dict[str, int], list[int]]:
    """Operand values whose every intermediate result is a non-negative integer (rejection sampling)."""
    for _ in range(_MAX_DRAWS):
        values = {var: rng.randint(lo, hi) for var, (lo, hi) in sorted(template.ranges.items())}
        try:
            results = evaluate_steps(template.steps, values)
        except ZeroDivisionError:
            continue
        if _results_acceptable(results):
            return values, [int(r) for r in results]
    raise ValueError(f"template {template.id!r}: no valid operands found in {_MAX_DRAWS} draws; widen its ranges")


def _solution_text(template: Template, values: dict[str, int], results: list[int]) -> str:
    env: dict[str, int] = dict(values)
    sentences = []
    for index, ((left, op, right), result) in enumerate(zip(template.steps, results, strict=True), start=1):
        sentences.append(f"{env[left]} {op} {env[right]} = {result}.")
        env[f"r{index}"] = result
    return " ".join(sentences) + f" The answer is {results[-1]}."


def _entities(rng: random.Random) -> dict[str, str]:
    name, name2 = rng.sample(NAMES, 2)
    box, boxes = rng.choice(CONTAINERS)
    return {"name": name, "name2": name2, "obj": rng.choice(OBJECTS), "box": box, "boxes": boxes,
            "place": rng.choice(PLACES)}


def _render(template: Template, rng: random.Random) -> Sample:
    values, results = _draw_values(template, rng)
    question = template.question.format(**_entities(rng), **{k: str(v) for k, v in values.items()})
    meta = {"template": template.id, "style": template.style, "values": values,
            "steps": [list(s) for s in template.steps], "results": results}
    return Sample(instruction=question, input="", output=_solution_text(template, values, results),
                  answer=str(results[-1]), meta=meta)


def generate_problems(n: int, split: Split = "train", seed: int = 0) -> list[Sample]:
    """``n`` arithmetic word problems of ``split``, identical for identical (n, split, seed).

    Templates are cycled in a seeded random order so every template is used
    (nearly) equally often; all randomness flows from ``random.Random(seed)``.
    """
    return _generate(n, templates_for(split), f"{split}:{seed}")


def _generate(n: int, templates: Sequence[Template], stream: str) -> list[Sample]:
    """``n`` problems from ``templates``, all randomness from ``random.Random(stream)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(stream)
    samples: list[Sample] = []
    while len(samples) < n:
        order = list(templates)
        rng.shuffle(order)
        samples.extend(_render(t, rng) for t in order[: n - len(samples)])
    return samples


def generate_validation_problems(n: int, seed: int = 0) -> list[Sample]:
    """``n`` validation problems: train templates, their own stream (``"validation:{seed}"``), none
    equal to one of the first :data:`VALIDATION_GUARD` train problems of the same seed (nor to a test
    problem: the test templates are disjoint)."""
    seen = {s.instruction for s in generate_problems(VALIDATION_GUARD, "train", seed)}
    samples: list[Sample] = []
    draw = n
    while len(samples) < n:
        samples = [s for s in _generate(draw, TRAIN_TEMPLATES, f"validation:{seed}") if s.instruction not in seen][:n]
        draw = 2 * draw + 16
    return samples


# --------------------------------------------------------------------------- user data (math_10k layout)

def _is_uri(path: str) -> bool:
    return "://" in path


def _record_to_sample(record: dict[str, Any], row: int, source: str) -> Sample:
    for name in REQUIRED_FIELDS:
        value = record.get(name)
        if value is None or str(value).strip() == "":
            raise ValueError(f"{source}: row {row} is missing required field {name!r}")
    input_text = record.get("input")
    return Sample(instruction=str(record["instruction"]), input="" if input_text is None else str(input_text),
                  output=str(record["output"]), answer=_answer_to_str(record["answer"]))


def _answer_to_str(answer: Any) -> str:
    """JSON numbers may arrive as floats (12.0): keep integers integral."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def records_to_samples(records: Iterable[dict[str, Any]], source: str = "<records>") -> list[Sample]:
    """Validate math_10k-layout dicts and convert them to :class:`Sample` (errors name field and row)."""
    return [_record_to_sample(dict(record), row, source) for row, record in enumerate(records)]


def load_math10k(path: str | Path, *, storage_options: dict[str, Any] | None = None,
                 limit: int | None = None, cache_dir: str | None = None) -> list[Sample]:
    """Load a math_10k-layout JSON/JSONL file (local path or fsspec URI) through ``datasets``.

    ``storage_options`` go to fsspec (e.g. ``{"anon": True}`` or an S3 ``endpoint_url``);
    ``limit`` keeps the first rows only.
    """
    path_str = str(path)
    if not _is_uri(path_str) and not Path(path_str).is_file():
        raise FileNotFoundError(f"math_10k data file not found: {path_str}")
    if not path_str.lower().endswith((".json", ".jsonl")):
        raise ValueError(f"math_10k data must be a .json or .jsonl file, got {path_str}")
    dataset = _load_json_dataset(path_str, storage_options, cache_dir)
    missing = [name for name in REQUIRED_FIELDS if name not in dataset.column_names]
    if missing:
        raise ValueError(f"{path_str}: row 0 is missing required field {missing[0]!r}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    samples = records_to_samples(dataset, source=path_str)
    logger.debug("loaded %d samples from %s", len(samples), path_str)
    return samples


def _load_json_dataset(path: str, storage_options: dict[str, Any] | None, cache_dir: str | None):
    from datasets import load_dataset  # heavy import, only when needed

    kwargs: dict[str, Any] = {"data_files": path, "split": "train"}
    if storage_options:
        kwargs["storage_options"] = storage_options
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    try:
        return load_dataset("json", **kwargs)
    except Exception as error:  # datasets wraps arrow/json errors in many types
        raise ValueError(f"could not read {path} as math_10k JSON/JSONL: {error}") from error


def save_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as math_10k JSONL (four fields per line); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample.to_record(), ensure_ascii=False) + "\n")
    return target


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    """All fields including ``meta`` (for debugging dumps)."""
    return asdict(sample)
