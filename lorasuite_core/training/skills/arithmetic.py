"""The built-in arithmetic word problems as a skill (``task:arithmetic:SPLIT`` = ``builtin:SPLIT``).

Splits: ``train`` and ``test`` are :func:`~lorasuite_core.training.task_data.generate_problems`'
(disjoint template sets); ``validation`` is
:func:`~lorasuite_core.training.task_data.generate_validation_problems`: the train templates drawn
from their own stream, with every problem equal to one of the first 2000 train problems of the
same seed left out, so it is disjoint from train (as far as any run trains) and from test.
Scoring is evaluation's: the last number of the generation, cut after the first "The answer is N"
(:func:`~lorasuite_core.training.evaluation.score_generation`), numerically within 1e-4.  Agreement
with a teacher (:meth:`ArithmeticSkill.agrees`) is distillation's final-number rule
(:func:`~lorasuite_core.training.agreement.final_answers_agree`), the rule for prompts without a task.
"""
from __future__ import annotations

import dataclasses

from lorasuite_core.training.skills.base import Skill, check_split
from lorasuite_core.training.task_data import Sample, generate_problems, generate_validation_problems


class ArithmeticSkill(Skill):
    max_new_tokens = 64

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        check_split(split)
        made = generate_validation_problems(n, seed) if split == "validation" else generate_problems(n, split, seed)
        return [dataclasses.replace(s, task=self.name) for s in made]

    def score(self, index: int, generation: str, sample: Sample):
        from lorasuite_core.training.evaluation import score_generation

        return score_generation(index, generation, sample.answer)

    def is_correct(self, answer: str | None, sample: Sample) -> bool:
        from lorasuite_core.training.evaluation import answers_match

        return answers_match(answer, sample.answer)

    def finished(self, text: str) -> bool:
        from lorasuite_core.training.evaluation import generation_finished

        return generation_finished(text)

    def target_text(self, generation: str) -> str:
        from lorasuite_core.training.agreement import scored_text

        return scored_text(generation)

    def agrees(self, student: str, teacher: str) -> bool:
        from lorasuite_core.training.agreement import final_answers_agree

        return final_answers_agree(student, teacher)
