"""Skills as data: a registry of tasks, each with disjoint, deterministic splits and its own scorer.

Design
------
A *skill* (:class:`~lorasuite_core.training.skills.base.Skill`) turns ``(split, count, seed)`` into
:class:`~lorasuite_core.training.task_data.Sample` records -- ``split`` one of ``train``,
``validation``, ``test``, disjoint by construction (each module's docstring says how) and identical
for identical arguments -- and scores a greedy generation against a sample (:meth:`Skill.score`),
with its own stop rule (:meth:`Skill.finished`) and generation budget (``max_new_tokens``).  Every
sample a skill makes carries the skill's name in ``Sample.task``, so evaluation scores it with that
skill's scorer (:func:`skill_of`; a sample without a task, e.g. from a user's math_10k file, is
scored as arithmetic: the final number).

The registry is data, in the PEFT/mergekit style: :data:`SKILLS` maps a name to ``"module:Class"``
(plus constructor arguments), imported only when the skill is used, so parsing a spec (options
validation, the CLI) never imports reasoning-gym or torch.

Spec syntax, next to files and ``builtin:train`` / ``builtin:test``::

    task:NAME:SPLIT[:COUNT]        e.g. task:bfcl:test:200, task:knowledge:train, task:arithmetic:validation:50

``COUNT`` (a positive integer) keeps the first COUNT samples; without it a skill with a finite
split (bfcl, knowledge) gives the whole split and a generated one ``default_count`` samples.
A further limit (``--samples``, ``--lft-samples``, ``--eval-samples``) keeps the first N of those.
The seed is the caller's (the run's ``--seed``), as for ``builtin:``.  ``builtin:SPLIT`` is the
arithmetic skill's ``task:arithmetic:SPLIT``: the same samples.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorasuite_core.training.skills.base import Skill

TASK = "task:"
SPLITS = ("train", "validation", "test")

#: name -> (``module:Class``, constructor keyword arguments); modules are imported on first use.
SKILLS: dict[str, tuple[str, dict[str, Any]]] = {
    "arithmetic": ("lorasuite_core.training.skills.arithmetic:ArithmeticSkill", {}),
    "family_relationships": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill",
                             {"dataset": "family_relationships"}),
    "letter_counting": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill", {"dataset": "letter_counting"}),
    "base_conversion": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill", {"dataset": "base_conversion"}),
    "spell_backward": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill", {"dataset": "spell_backward"}),
    "number_filtering": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill",
                         {"dataset": "number_filtering", "max_new_tokens": 96}),     # lists of up to 10 numbers
    "chain_sum": ("lorasuite_core.training.skills.reasoning:ReasoningGymSkill",
                  {"dataset": "chain_sum", "config": {"max_terms": 4, "max_digits": 2}}),
    "bfcl": ("lorasuite_core.training.skills.bfcl:FunctionCallingSkill", {}),
    "knowledge": ("lorasuite_core.training.skills.knowledge:KnowledgeSkill", {}),
}
DEFAULT_SKILL = "arithmetic"


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``task:NAME:SPLIT[:COUNT]``."""

    name: str
    split: str
    count: int | None = None

    def __str__(self) -> str:
        return f"{TASK}{self.name}:{self.split}" + ("" if self.count is None else f":{self.count}")


def known_tasks() -> str:
    return ", ".join(sorted(SKILLS))


def is_task_spec(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(TASK)


def parse_spec(ref: str) -> TaskSpec:
    """``task:NAME:SPLIT[:COUNT]`` -> :class:`TaskSpec`; ValueError (one line, the known tasks listed) if bad."""
    syntax = f"write task:NAME:SPLIT[:COUNT] with SPLIT one of {', '.join(SPLITS)}; known tasks: {known_tasks()}"
    parts = ref[len(TASK):].split(":") if ref.startswith(TASK) else []
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"task spec {ref!r}: {syntax}")
    name, split = parts[0].strip(), parts[1].strip()
    if name not in SKILLS:
        raise ValueError(f"task spec {ref!r}: unknown task {name!r}; known tasks: {known_tasks()}")
    if split not in SPLITS:
        raise ValueError(f"task spec {ref!r}: unknown split {split!r}; {syntax}")
    count = None
    if len(parts) == 3:
        text = parts[2].strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"task spec {ref!r}: COUNT must be a positive integer, got {text!r}; {syntax}")
        count = int(text)
    return TaskSpec(name, split, count)


def check_data_ref(ref: str | None) -> str | None:
    """Options validation: a ``task:`` spec must parse (other references are checked when read)."""
    if is_task_spec(ref):
        parse_spec(ref)  # type: ignore[arg-type]
    return ref


@lru_cache(maxsize=None)
def get_skill(name: str) -> "Skill":
    """The registered skill ``name`` (one instance per process)."""
    if name not in SKILLS:
        raise ValueError(f"unknown task {name!r}; known tasks: {known_tasks()}")
    target, kwargs = SKILLS[name]
    module_name, class_name = target.split(":")
    skill = getattr(importlib.import_module(module_name), class_name)(name=name, **kwargs)
    return skill


def skill_of(sample) -> "Skill":
    """The skill that scores ``sample``: its ``task``, or arithmetic (the final number) without one."""
    return get_skill(getattr(sample, "task", None) or DEFAULT_SKILL)


def load_task_samples(ref: str, limit: int | None, seed: int, default_count: int) -> list:
    """Samples of a ``task:`` spec: COUNT (or the whole finite split, or ``default_count``), then the first ``limit``."""
    spec = parse_spec(ref)
    skill = get_skill(spec.name)
    count = spec.count
    if count is None:
        count = skill.split_size(spec.split) or default_count
    if limit is not None:
        count = min(count, limit)
    try:
        return skill.samples(spec.split, count, seed)
    except ValueError as exc:
        raise ValueError(f"task spec {ref!r}: {exc}") from None


def data_identity(ref: str) -> str:
    """What decides a ``task:`` spec's samples besides the seed: the spec and the skill's data version."""
    spec = parse_spec(ref)
    return f"{spec}@{get_skill(spec.name).data_version}"
