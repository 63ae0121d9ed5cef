"""Agreement between a student's and a teacher's answers, and accuracy against gold answers.

* :func:`answers_agree` scores a prompt of a registered skill (``Prompt.task``) with that skill's
  scorer, the teacher's answer taking the gold answer's place
  (:meth:`~lorasuite_core.training.skills.base.Skill.agrees`); a prompt without a task (``builtin:``,
  a file) by :func:`final_answers_agree`: the last number of the scored text (:func:`scored_text`:
  cut at the first stop marker and right after the first "The answer is N" sentence), compared
  numerically (:func:`~lorasuite_core.training.evaluation.answers_match`), or -- where either side
  holds no number -- the whitespace-normalised scored text itself.
* :func:`agreement_flags` says per prompt whether the answers agree, each by its prompt's task;
  :func:`teacher_agreement` is the fraction that do.
* :func:`accuracy` scores gold samples by their skill, gold strings by the final number.
"""
from __future__ import annotations

from typing import Any, Sequence

from lorasuite_core.training.evaluation import (ANSWER_SENTENCE, STOP_MARKERS, answers_match, extract_final_number,
                                                truncate_generation)


def scored_text(text: str) -> str:
    """The part of a generation evaluation scores: cut at a stop marker, and after "answer is N" (+ its period)."""
    cut = min((text.find(m) for m in STOP_MARKERS if m in text), default=len(text))
    text = text[:cut]
    match = ANSWER_SENTENCE.search(text)
    if match:
        end = match.end() + (1 if text[match.end():match.end() + 1] == "." else 0)
        text = text[:end]
    return text.rstrip()


def _skill(task: str | None):
    from lorasuite_core.training.skills import get_skill

    return None if task is None else get_skill(task)


def _text_of(item) -> str:
    """A completion's text (a :class:`~lorasuite_core.training.distill.Completion` or a string)."""
    return item if isinstance(item, str) else item.text


def final_answers_agree(student: Any, teacher: Any) -> bool:
    """Same final number (numerically), or -- where either has none -- the same normalised scored text."""
    s_text, t_text = truncate_generation(_text_of(student)), truncate_generation(_text_of(teacher))
    s_num, t_num = extract_final_number(s_text), extract_final_number(t_text)
    if s_num is None or t_num is None:
        return s_num is None and t_num is None and " ".join(s_text.split()) == " ".join(t_text.split())
    return answers_match(s_num, t_num)


def answers_agree(student: Any, teacher: Any, task: str | None = None) -> bool:
    """The skill ``task``'s scorer with the teacher's answer as the reference; without a task,
    :func:`final_answers_agree`."""
    skill = _skill(task)
    if skill is None:
        return final_answers_agree(student, teacher)
    return skill.agrees(_text_of(student), _text_of(teacher))


def _tasks(tasks: Sequence[str | None] | None, n: int) -> Sequence[str | None]:
    if tasks is None:
        return [None] * n
    if len(tasks) != n:
        raise ValueError(f"{len(tasks)} tasks for {n} completions")
    return tasks


def agreement_flags(student: Sequence[Any], teacher: Sequence[Any],
                    tasks: Sequence[str | None] | None = None) -> list[bool]:
    """Per prompt, whether the student's and the teacher's answers agree (:func:`answers_agree`, by its task)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student completions for {len(teacher)} teacher completions")
    if not teacher:
        raise ValueError("teacher agreement needs at least one prompt")
    return [answers_agree(s, t, task) for s, t, task in zip(student, teacher, _tasks(tasks, len(teacher)), strict=True)]


def teacher_agreement(student: Sequence[Any], teacher: Sequence[Any],
                      tasks: Sequence[str | None] | None = None) -> float:
    """Fraction of prompts whose student and teacher answers agree (:func:`agreement_flags`)."""
    flags = agreement_flags(student, teacher, tasks)
    return sum(flags) / len(flags)


def accuracy(completions: Sequence[Any], answers: Sequence[str | Any]) -> float:
    """Accuracy against gold ``answers``: a gold sample (:class:`~lorasuite_core.training.task_data.Sample`) is
    scored by its skill's scorer, a gold string by its final number (exact match)."""
    from lorasuite_core.training.skills import skill_of

    if len(completions) != len(answers) or not answers:
        raise ValueError(f"{len(completions)} completions for {len(answers)} answers (need >= 1 of each, equal)")
    right = 0
    for index, (completion, gold) in enumerate(zip(completions, answers, strict=True)):
        text = _text_of(completion)
        if isinstance(gold, str):
            right += answers_match(extract_final_number(truncate_generation(text)), gold)
        else:
            right += skill_of(gold).score(index, text, gold).correct
    return right / len(answers)
