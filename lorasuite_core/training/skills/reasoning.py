"""Procedural task families of reasoning-gym as skills: its generators and its verifiers.

Each registered name is a reasoning-gym dataset, with its default configuration unless the registry gives
``config`` (``reasoning_gym.create_dataset(dataset, seed=s, size=..., **config)``), generated locally, no network;
``max_new_tokens`` (default 32) is the generation budget, which a dataset with long answers (lists) raises.

Splits are disjoint by the hash partition of :mod:`.base`: item ``i`` of the stream seeded with
``sha256("{name}:{split}:{seed}")`` is kept for ``split`` only if the sha256 of its question text
falls in that split's buckets (test 2/10, validation 1/10, train 7/10), and a question is kept
once; so no question of one split is in another, whatever the seeds.  ``samples(split, n, seed)``
are the first ``n`` kept items: deterministic, and a prefix of any longer draw.

A sample's instruction is the question plus :data:`~.base.FORMAT_LINE`; its target output is
``"The answer is X."`` with reasoning-gym's answer X (short answers: no worked solution, so
generation is cheap).  Scoring takes the answer of the answer sentence (:func:`~.base.extract_answer`)
and calls the dataset's own ``score_answer(answer, entry)`` with the generator's entry (kept in
``Sample.meta``); only a full score (1.0) counts as correct.  Agreement with a teacher
(:meth:`~.base.Skill.agrees`) calls the same verifier with the teacher's answer as the entry's answer
(a verifier that needs the generator's metadata, which a bare prompt lacks, falls back to equal text).
"""
from __future__ import annotations

import hashlib
from functools import cached_property

from lorasuite_core.training.skills.base import FORMAT_LINE, Skill, in_split
from lorasuite_core.training.task_data import Sample

_STREAM_SIZE = 10**9  # reasoning-gym's virtual dataset size; items are made on access


class ReasoningGymSkill(Skill):
    max_new_tokens = 32

    def __init__(self, name: str, dataset: str, config: dict | None = None, max_new_tokens: int | None = None):
        super().__init__(name)
        self.dataset, self.config = dataset, dict(config or {})
        if max_new_tokens is not None:
            self.max_new_tokens = max_new_tokens

    @cached_property
    def data_version(self) -> str:  # type: ignore[override]
        from importlib.metadata import version

        return f"reasoning-gym {version('reasoning-gym')}" + (f" {sorted(self.config.items())}" if self.config else "")

    @cached_property
    def _scorer(self):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset, seed=0, size=1, **self.config)

    def _stream(self, split: str, seed: int):
        import reasoning_gym

        stream_seed = int(hashlib.sha256(f"{self.dataset}:{split}:{seed}".encode()).hexdigest()[:8], 16)
        return reasoning_gym.create_dataset(self.dataset, seed=stream_seed, size=_STREAM_SIZE, **self.config)

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        self._check_count(split, n)
        stream, seen, out = self._stream(split, seed), set(), []
        limit = 50 * n + 1000
        for index in range(limit):
            if len(out) == n:
                break
            entry = stream[index]
            question = entry["question"]
            if question in seen or not in_split(question, split):
                continue
            seen.add(question)
            out.append(self._sample(f"{question.strip()}\n{FORMAT_LINE}", str(entry["answer"]),
                                    meta={"entry": entry, "stream_index": index}))
        if len(out) < n:
            raise ValueError(f"task {self.name}: only {len(out)} distinct {split} questions in {limit} draws")
        return out

    def is_correct(self, answer: str | None, sample: Sample) -> bool:
        entry = (sample.meta or {}).get("entry") or {"answer": sample.answer, "metadata": {}}
        try:
            return float(self._scorer.score_answer(answer, entry)) >= 1.0
        except (KeyError, TypeError, ValueError):   # a verifier that needs the generator's metadata: a teacher's
            return answer is not None and answer.strip() == sample.answer.strip()   # answer compares as text
