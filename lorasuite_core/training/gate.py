"""Quality gate before publishing a migrated (optionally distilled) adapter.

On held-out prompts ``x_1 .. x_n`` with the teacher's completions ``t_i`` (old model + old adapter,
:func:`~lorasuite_core.training.distill.greedy_completions`):

* student agreement ``a_S = mean_i [answer(S(x_i)) == answer(t_i)]`` -- new model + migrated adapter;
* bare agreement    ``a_B = mean_i [answer(B(x_i)) == answer(t_i)]`` -- the new model alone (the same
  loaded model with its adapter disabled), i.e. what publishing no adapter at all would give;
* with labelled evaluation data (gold answers ``g_i``) also the exact-match accuracies
  ``acc_S``, ``acc_B`` (and the teacher's ``acc_T``, for the record).

``answer`` and agreement are :func:`~lorasuite_core.training.agreement.answers_agree`'s: a prompt of a
registered skill (``Prompt.task``) is judged by that skill's scorer with the teacher's answer as the
reference, and generated with its stop rule and budget; a prompt without a task by the final number.
Accuracy scores gold samples by their skill's scorer (gold strings: the final number).  Decision::

    passed  <=>  a_S >= a_B + margin   and (labelled)  acc_S >= acc_B + accuracy_margin

(``accuracy_margin`` defaults to 0: with gold answers the adapter must not make the new model worse at
the task, while agreement must clear ``margin``.  Requiring ``margin`` on accuracy too would refuse a
perfect migration whenever the old adapter itself is no more accurate than the bare new model --
measured on the tiny test pair: agreement 1.000 vs 0.125, accuracy 0.000 for teacher, student and bare
model alike).  A zeroed adapter computes exactly the bare model, so
``a_S == a_B`` and it fails for any ``margin > 0``.  :func:`check_gate` turns a failed result into
:class:`QualityGateFailed` (a LorasuiteError whose message carries the numbers; ``.result`` holds them)
for the pipeline to fail that entry with.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.training.agreement import accuracy, teacher_agreement
from lorasuite_core.training.distill import Completion, greedy_completions
from lorasuite_core.training.evaluation import load_for_generation
from lorasuite_core.training.prompts import Prompt

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.05


@dataclass
class GateResult:
    """The gate's numbers and decision (``*_accuracy`` are None without labelled evaluation data)."""

    passed: bool
    margin: float
    n: int
    student_agreement: float
    bare_agreement: float
    student_accuracy: float | None = None
    bare_accuracy: float | None = None
    teacher_accuracy: float | None = None
    accuracy_margin: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QualityGateFailed(LorasuiteError):
    """The migrated adapter did not clear the quality gate; ``result`` holds the numbers."""

    def __init__(self, result: GateResult):
        super().__init__(f"quality gate failed: {result.reason}")
        self.result = result

    def __reduce__(self):  # picklable across process boundaries (Prefect workers)
        return (type(self), (self.result,))


def _check_margin(name: str, value: float) -> None:
    if not -1.0 <= value <= 1.0:
        raise LorasuiteError(f"quality gate {name} must be in [-1, 1], got {value}")


def gate_decision(student_agreement: float, bare_agreement: float, *, n: int, margin: float = DEFAULT_MARGIN,
                  student_accuracy: float | None = None, bare_accuracy: float | None = None,
                  teacher_accuracy: float | None = None, accuracy_margin: float | None = None) -> GateResult:
    """Pass iff agreement clears the bare model's by ``margin`` (and accuracy by ``accuracy_margin``, default 0, if labelled)."""
    _check_margin("margin", margin)
    labelled = student_accuracy is not None and bare_accuracy is not None
    accuracy_margin = (0.0 if accuracy_margin is None else accuracy_margin) if labelled else None
    if accuracy_margin is not None:
        _check_margin("accuracy margin", accuracy_margin)
    tol = 1e-12  # fractions of n compare exactly up to float rounding of the margin
    agree_ok = student_agreement + tol >= bare_agreement + margin
    acc_ok = not labelled or student_accuracy + tol >= bare_accuracy + accuracy_margin  # type: ignore[operator]
    parts = [f"teacher agreement {student_agreement:.3f} (bare new model {bare_agreement:.3f}, margin {margin:g}, "
             f"{n} held-out prompts)"]
    if labelled:
        parts.append(f"accuracy {student_accuracy:.3f} (bare new model {bare_accuracy:.3f}, margin {accuracy_margin:g})")
    failed = [p for p, ok in zip(parts, (agree_ok, acc_ok)) if not ok]
    reason = ("below the bare model + margin: " + "; ".join(failed)) if failed else ("passed: " + "; ".join(parts))
    return GateResult(passed=not failed, margin=margin, n=n, student_agreement=student_agreement,
                      bare_agreement=bare_agreement, student_accuracy=student_accuracy, bare_accuracy=bare_accuracy,
                      teacher_accuracy=teacher_accuracy, accuracy_margin=accuracy_margin, reason=reason)


def check_gate(result: GateResult) -> GateResult:
    """``result`` when it passed; else raise :class:`QualityGateFailed` with its numbers."""
    if not result.passed:
        raise QualityGateFailed(result)
    return result


def quality_gate(new_model_dir: str | Path, adapter_dir: str | Path, prompts: Sequence[Prompt],
                 teacher_completions: Sequence[Completion | str], *, answers: Sequence[Any] | None = None,
                 margin: float = DEFAULT_MARGIN, accuracy_margin: float | None = None,
                 student_completions: Sequence[Completion | str] | None = None, max_new_tokens: int | None = None,
                 batch_size: int = 16, dtype: str = "auto", device: str = "auto") -> GateResult:
    """Evaluate the adapter and the bare new model on ``prompts`` against the teacher; decide (no raise).

    ``student_completions``: already generated ones (e.g. :class:`~lorasuite_core.training.distill.DistillReport`'s
    ``heldout_student``) are reused; the bare model is always generated, from the same loaded model.
    ``answers``: gold samples (scored by their skill) or gold strings (the final number); ``max_new_tokens``
    None: each prompt's skill budget (:func:`~lorasuite_core.training.distill.greedy_completions`).
    """
    if len(teacher_completions) != len(prompts) or not prompts:
        raise ValueError(f"{len(teacher_completions)} teacher completions for {len(prompts)} held-out prompts")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} gold answers for {len(prompts)} held-out prompts")
    model, tokenizer = load_for_generation(new_model_dir, adapter_dir, dtype=dtype, device=device)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    student = list(student_completions) if student_completions is not None else \
        greedy_completions(model, tokenizer, prompts, **gen)
    with model.disable_adapter():
        bare = greedy_completions(model, tokenizer, prompts, **gen)
    scores: dict[str, Any] = {}
    if answers is not None:
        scores = {"student_accuracy": accuracy(student, answers), "bare_accuracy": accuracy(bare, answers),
                  "teacher_accuracy": accuracy(teacher_completions, answers)}
    tasks = [p.task for p in prompts]
    result = gate_decision(teacher_agreement(student, teacher_completions, tasks),
                           teacher_agreement(bare, teacher_completions, tasks),
                           n=len(prompts), margin=margin, accuracy_margin=accuracy_margin, **scores)
    logger.info("quality gate %s", result.reason)
    return result
