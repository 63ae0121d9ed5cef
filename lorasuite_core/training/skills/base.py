"""What every skill shares: the interface, the answer-sentence scorer, the hash partition.

Design
------
* :class:`Skill` -- ``samples(split, n, seed)``, ``score(index, generation, sample)``,
  ``finished(text)`` (the stop rule generation uses), ``max_new_tokens``, ``split_size(split)``
  (None for a generated, unbounded split) and ``data_version`` (part of pipeline stage keys).
* Answer sentence: skills whose target is a short answer train on ``"The answer is X."`` and
  their instruction ends with :data:`FORMAT_LINE`, so a bare model is told the format.  The
  scored answer (:func:`extract_answer`) is, in the generation cut at the first stop marker of
  evaluation, the text after the first "answer is" up to the end of its sentence (a period
  followed by white space) or line, a repeated "The answer is" dropped (quotes, ``*`` and
  backticks stripped); without such a sentence, the first non-empty line.
  :func:`answer_finished` stops a row once that line is complete (or at a stop marker).
* Teacher agreement (distillation, the quality gate): :meth:`Skill.target_text` is the part of a
  generation the scorer reads -- the distillation target -- and :meth:`Skill.agrees` scores a
  student's generation with the skill's own scorer, the teacher's answer taking the gold answer's
  place (:meth:`Skill.reference`: a sample whose answer is the teacher's).  Where the teacher gave
  no answer, the two agree only when neither did and their scored texts are equal (whitespace
  normalised).
* Hash partition (:func:`bucket`): a generated item belongs to the split that the sha256 of its
  question text names -- buckets 0-1 of 10 test, 2 validation, 3-9 train -- so one question can
  be in one split only, whatever the seeds of the streams it was drawn from.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

from lorasuite_core.training.task_data import Sample

FORMAT_LINE = "End your reply with: The answer is <answer>."
_ANSWER = re.compile(r"answer is\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s")   # "X. The answer is X. ..." -> X (a decimal point has no space after it)
_BUCKETS = {"test": (0, 1), "validation": (2,), "train": (3, 4, 5, 6, 7, 8, 9)}


def stop_markers() -> Sequence[str]:
    from lorasuite_core.training.evaluation import STOP_MARKERS

    return STOP_MARKERS


def cut_at_stop_marker(text: str) -> str:
    cut = min((text.find(m) for m in stop_markers() if m in text), default=len(text))
    return text[:cut]


def clean_answer(text: str) -> str:
    """Strip whitespace, a trailing period, quotes, ``*`` and backticks."""
    text = text.strip().strip("*`\"' ").strip()
    return text[:-1].strip().strip("*`\"' ") if text.endswith(".") else text


def extract_answer(generation: str) -> str | None:
    """The answer of "... The answer is X." (first such sentence), else the first non-empty line; None if empty."""
    text = cut_at_stop_marker(generation)
    match = _ANSWER.search(text)
    if match:
        answer = match.group(1)
        while (again := _ANSWER.match(answer.strip().removeprefix("The ").removeprefix("the "))) is not None:
            answer = again.group(1)   # "The answer is: The answer is X." -> X
        return clean_answer(_SENTENCE_END.split(answer, maxsplit=1)[0])
    lines = [line for line in text.splitlines() if line.strip()]
    return clean_answer(lines[0]) if lines else None


def answer_sentence_text(generation: str) -> str:
    """The generation up to the end of its first answer sentence (period kept) or line; cut at a stop marker."""
    text = cut_at_stop_marker(generation)
    match = _ANSWER.search(text)
    if match:
        line_end = text.find("\n", match.start())
        end = len(text) if line_end < 0 else line_end
        sentence = _SENTENCE_END.search(text, match.start(1), end + 1 if line_end >= 0 else len(text))
        text = text[:sentence.start() + 1] if sentence and sentence.start() < end else text[:end]
    return text.rstrip()


def answer_finished(text: str) -> bool:
    """A stop marker appeared, or the first "answer is ..." line is complete."""
    if any(marker in text for marker in stop_markers()):
        return True
    match = _ANSWER.search(text)
    return match is not None and "\n" in text[match.start():]


def bucket(question: str) -> int:
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16) % 10


def in_split(question: str, split: str) -> bool:
    """Hash partition: the split that owns ``question`` (disjoint across splits)."""
    return bucket(question) in _BUCKETS[split]


def check_split(split: str) -> None:
    if split not in _BUCKETS:
        raise ValueError(f"split must be one of train, validation, test; got {split!r}")


class Skill:
    """Interface of a registered skill (see the module docstring); subclasses set the class attributes."""

    max_new_tokens: int = 32
    data_version: str = "1"

    def __init__(self, name: str):
        self.name = name

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        raise NotImplementedError

    def split_size(self, split: str) -> int | None:
        """Number of samples a finite split holds; None for a generated split."""
        return None

    def is_correct(self, answer: str | None, sample: Sample) -> bool:
        raise NotImplementedError

    def predicted(self, generation: str) -> str | None:
        return extract_answer(generation)

    def finished(self, text: str) -> bool:
        return answer_finished(text)

    def target_text(self, generation: str) -> str:
        """The part of ``generation`` the scorer reads (a distillation target ends there)."""
        return answer_sentence_text(generation)

    def reference(self, answer: str) -> Sample:
        """A sample whose gold answer is ``answer`` (the teacher's), for :meth:`agrees`."""
        return self._sample("", answer)

    def agrees(self, student: str, teacher: str) -> bool:
        """The student's generation is right by this skill's scorer with the teacher's answer as the gold one;
        where the teacher gave no answer: neither did the student and their scored texts are equal."""
        reference = self.predicted(teacher)
        if reference is None:
            return self.predicted(student) is None and \
                " ".join(self.target_text(student).split()) == " ".join(self.target_text(teacher).split())
        answer = self.predicted(student)
        return answer is not None and bool(self.is_correct(answer, self.reference(reference)))

    def score(self, index: int, generation: str, sample: Sample):
        """A :class:`~lorasuite_core.training.evaluation.Prediction` of ``generation`` against ``sample``."""
        from lorasuite_core.training.evaluation import Prediction

        answer = self.predicted(generation)
        return Prediction(index=index, gold=sample.answer, predicted=answer,
                          correct=answer is not None and bool(self.is_correct(answer, sample)), generation=generation)

    def _sample(self, instruction: str, answer: str, *, output: str | None = None, input: str = "",
                meta: dict[str, Any] | None = None) -> Sample:
        return Sample(instruction=instruction, input=input, output=output or f"The answer is {answer}.",
                      answer=answer, meta=meta, task=self.name)

    def _check_count(self, split: str, n: int) -> None:
        check_split(split)
        size = self.split_size(split)
        if n < 0:
            raise ValueError(f"task {self.name}: the number of samples must be >= 0, got {n}")
        if size is not None and n > size:
            raise ValueError(f"task {self.name}: the {split} split holds {size} samples, {n} asked for")
