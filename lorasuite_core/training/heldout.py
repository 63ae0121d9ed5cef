"""Distillation's held-out prompts, with the teacher's and the distilled student's completions, as a file.

The distill stage writes ``heldout_prompts.json`` next to the distilled adapter: each record is a
prompt (``instruction``, ``input``, ``task``: its skill or null) with the teacher's and the student's greedy completions on it
(``{"text", "ids"}``), generated as the quality gate generates them, so the gate and the fidelity
stage reuse them instead of generating again.  JSON only; a malformed file is one
:class:`~lorasuite_core.errors.LorasuiteError` line.
"""
from __future__ import annotations

import json
from pathlib import Path

from lorasuite_core.errors import LorasuiteError

HELDOUT = "heldout_prompts.json"
#: The same records for distillation's training prompts, teacher completions only (a second distillation of the
#: adapter on the same prompts, ``--route fresh-distill`` beside ``distill``, reads them instead of generating).
TEACHER_TARGETS = "teacher_targets.json"


def write_heldout(path: Path, prompts: list, teacher: list, student: list | None = None) -> None:
    """Distillation's held-out prompts with the teacher's and the distilled student's greedy completions on them
    (generated as the gate generates them), so the gate only has the bare model left to generate; without
    ``student``, the teacher's only."""
    as_dict = lambda c: {"text": c.text, "ids": list(c.ids)}
    student = [None] * len(prompts) if student is None else student
    path.write_text(json.dumps([{"instruction": p.instruction, "input": p.input, "task": p.task, "teacher": as_dict(t),
                                 **({"student": as_dict(s)} if s is not None else {})}
                                for p, t, s in zip(prompts, teacher, student, strict=True)]))


def read_heldout(path: Path) -> tuple[list, list | None, list | None]:
    """``(prompts, teacher completions, student completions)`` of :func:`write_heldout` (completions None in a
    record written without them); a malformed file is a one-line error, not a traceback."""
    from lorasuite_core.training import distill as D
    from lorasuite_core.training import prompts as P
    from lorasuite_core.training.skills import SKILLS

    def completion(record: dict, key: str):
        value = record.get(key)
        if value is None:
            return None
        if not (isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("ids"), list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in value["ids"])):
            raise ValueError(f"{key} is not a {{text, ids}} completion")
        return D.Completion(value["text"], tuple(value["ids"]))

    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not records:
            raise ValueError("not a non-empty list")
        prompts, teacher, student = [], [], []
        for record in records:
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                    or not isinstance(record.get("input", ""), str):
                raise ValueError("a record without a string instruction")
            task = record.get("task")
            if task is not None and task not in SKILLS:
                raise ValueError(f"unknown task {task!r}")
            prompts.append(P.Prompt(record["instruction"], record.get("input", ""), task))
            teacher.append(completion(record, "teacher"))
            student.append(completion(record, "student"))
    except (OSError, ValueError) as exc:
        raise LorasuiteError(f"distillation's held-out prompts {path}: {exc}") from None
    whole = lambda items: items if all(c is not None for c in items) else None
    return prompts, whole(teacher), whole(student)
