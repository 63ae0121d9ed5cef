"""The route of a migration: candidate adapters scored against the teacher, the best one that clears the gate.

Candidates, cheapest first (:data:`ROUTES`): ``copy`` (the old adapter as is), ``transfer`` (the
LoRASuite transfer, + labelled LFT where given), ``distill`` (the transfer distilled from the
teacher), ``fresh-distill`` (a fresh LoRA, B = 0, distilled the same way).  On the quality gate's
held-out prompts ``x_1 .. x_n`` with the teacher's completions ``t_i`` (:mod:`.gate`) each candidate
``c`` gets::

    a_c  = mean_i [answer(S_c(x_i)) == answer(t_i)]       teacher agreement of new model + c
    a_B  = the bare new model's (generated once, shared by every candidate)
    pass_c = gate_decision(a_c, a_B, margin)               (and accuracy >= bare with gold answers)
    F_c  = (B0 - B1_c) / (B0 - A1)                         fidelity (:mod:`.fidelity`), None: no gap

Choice, among the candidates that pass, cheapest first: the cheapest is the current choice ``i``, and each
costlier candidate ``c`` in turn replaces it when ``c`` *beats* ``i``.  On the ``n`` held-out prompts let
``w`` = the prompts where ``c`` agrees with the teacher and ``i`` does not, ``l`` = the reverse (the discordant
prompts; both agree or both miss on the others).  With the one-sided exact sign test
``p(w, l) = P(X >= w), X ~ Binomial(w + l, 1/2)`` (``scipy.stats.binomtest``)::

    c beats i  <=>  p(w, l) <= ALPHA                                  (c agrees significantly more often)
                or  p(l, w) >  ALPHA  and  F_c > F_i + FIDELITY_TOLERANCE      (no significant difference either
                                                                      way, and c closes more of the gap)

(None fidelity compares below any number.)  Without per-prompt flags (numbers from elsewhere) the counts are
taken as ``w - l = n (a_c - a_i)`` with the other side 0, the most favourable split for the larger count.

Why a test and not the higher agreement: on 16 held-out prompts one prompt is 6 points, and the benchmarks'
candidates differ by about that much (benchmarks/SKILL_FLEET*.md, 3 seeds: distill and fresh-distill within 0.07 of
each other on every skill, and where the interval excludes 0 the cheaper distill is the better; copy and distill
within 0.07 on the same-shape pair).  Taking the higher agreement picked the costlier route on the difference of one
prompt.  Now a costlier route has to agree with the teacher on clearly more prompts (5 prompts where it alone agrees
and none the other way: ``0.5^5 = 0.031``; 6 against 1 is not enough, 0.0625; 7 against 1 is, 0.035), or, where
agreement cannot tell them apart, close more of the gap to the teacher, the per-character measure over every answer
token.  Replayed on the benchmarks' recorded decisions: benchmarks/ROUTE_RULE.md.  When none passes,
:class:`RouteFailed` names the best candidate by the same rule (gate ignored) with its numbers; nothing is published.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.training.gate import DEFAULT_MARGIN, GateResult, gate_decision

log = logging.getLogger(__name__)

#: Every route, cheapest first (``auto`` tries the candidates in this order).
ROUTES = ("copy", "transfer", "distill", "fresh-distill")

#: Fidelity a costlier candidate must gain over a cheaper one at equal agreement to be chosen.
FIDELITY_TOLERANCE = 0.05

#: One-sided level of the sign test by which a costlier candidate's held-out agreement beats a cheaper one's.
ALPHA = 0.05


@dataclass
class Candidate:
    """One candidate's numbers: the gate's result on the held-out prompts and its fidelity."""

    route: str
    gate: GateResult
    fidelity: float | None
    agrees: tuple[bool, ...] | None = None      # per held-out prompt: the answer agrees with the teacher's

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "passed": self.gate.passed, "teacher_agreement": self.gate.student_agreement,
                "bare_agreement": self.gate.bare_agreement, "accuracy": self.gate.student_accuracy,
                "fidelity": self.fidelity, "gate": asdict(self.gate),
                "agrees": None if self.agrees is None else "".join("1" if a else "0" for a in self.agrees)}

    def numbers(self) -> str:
        f = "n/a" if self.fidelity is None else f"{self.fidelity:.3f}"
        accuracy = "" if self.gate.student_accuracy is None else f", accuracy {self.gate.student_accuracy:.3f}"
        return (f"{self.route}: teacher agreement {self.gate.student_agreement:.3f} (bare new model "
                f"{self.gate.bare_agreement:.3f}, margin {self.gate.margin:g}, n={self.gate.n}){accuracy}, fidelity {f}")


class RouteFailed(LorasuiteError):
    """No candidate route cleared the quality gate; ``best`` is the best one's numbers."""

    def __init__(self, best: str):
        super().__init__(f"route auto: no candidate clears the quality gate; the best, {best}")
        self.best = best

    def __reduce__(self):  # picklable across process boundaries (Prefect workers)
        return (type(self), (self.best,))


def _cost(candidate: Candidate) -> int:
    return ROUTES.index(candidate.route)


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: ``P(X >= wins)``, ``X ~ Binomial(wins + losses, 1/2)`` (1 when ``wins`` is 0)."""
    from scipy.stats import binomtest

    return 1.0 if wins <= 0 else float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def discordant(c: Candidate, i: Candidate) -> tuple[int, int]:
    """``(w, l)``: held-out prompts where only ``c`` agrees with the teacher, and where only ``i`` does."""
    if c.agrees is not None and i.agrees is not None and len(c.agrees) == len(i.agrees):
        return (sum(a and not b for a, b in zip(c.agrees, i.agrees)),
                sum(b and not a for a, b in zip(c.agrees, i.agrees)))
    diff = round((c.gate.student_agreement - i.gate.student_agreement) * max(c.gate.n, i.gate.n))
    return max(diff, 0), max(-diff, 0)


def beats(c: Candidate, i: Candidate) -> bool:
    """The module docstring's rule: whether the costlier ``c`` replaces the current choice ``i``."""
    wins, losses = discordant(c, i)
    if sign_test_p(wins, losses) <= ALPHA:
        return True
    if sign_test_p(losses, wins) <= ALPHA:
        return False
    low = float("-inf")
    mine, theirs = (low if x.fidelity is None else x.fidelity for x in (c, i))
    return mine > theirs + FIDELITY_TOLERANCE


def best(candidates: Sequence[Candidate]) -> Candidate:
    """The module docstring's rule over ``candidates`` (any, gate ignored); ValueError when empty."""
    if not candidates:
        raise ValueError("no candidate routes")
    ordered = sorted(candidates, key=_cost)
    chosen = ordered[0]
    for candidate in ordered[1:]:
        if beats(candidate, chosen):
            chosen = candidate
    return chosen


def choose(candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
    """The chosen candidate and why, or :class:`RouteFailed` when none clears the gate."""
    passed = [c for c in candidates if c.gate.passed]
    if not passed:
        raise RouteFailed(best(candidates).numbers())
    chosen = best(passed)
    others = [c.route for c in passed if c is not chosen]
    why = (f"{chosen.numbers()}; the best of {len(passed)} candidate(s) that clear the quality gate "
           f"(cheapest first; a costlier one only with significantly more agreement, sign test at "
           f"{ALPHA:g}, or else more fidelity by {FIDELITY_TOLERANCE:g})")
    if others:
        why += f"; also cleared: {', '.join(others)}"
    failed = [c.route for c in candidates if not c.gate.passed]
    if failed:
        why += f"; below the gate: {', '.join(failed)}"
    return chosen, why


def score_candidates(new_model_dir: str | Path, adapters: dict[str, str | Path], prompts: Sequence,
                     teacher: Sequence, *, answers: Sequence[str] | None = None, margin: float = DEFAULT_MARGIN,
                     students: dict[str, Sequence] | None = None, fidelity: dict[str, float | None] | None = None,
                     max_new_tokens: int | None = None, batch_size: int = 16, dtype: str = "auto") -> list[Candidate]:
    """Each named adapter on the new model against the teacher's completions (the gate's measure), in the order
    given; the bare new model is generated once, in ``dtype`` (``load_for_generation``'s).  ``students``:
    completions already generated (distillation's).
    Generation and agreement as the gate's (:func:`~lorasuite_core.training.gate.quality_gate`): each prompt's skill
    budget (``max_new_tokens`` None) and scorer."""
    from lorasuite_core.training.agreement import accuracy, agreement_flags
    from lorasuite_core.training.distill import greedy_completions
    from lorasuite_core.training.evaluation import load_for_generation

    if not adapters or not prompts or len(teacher) != len(prompts):
        raise ValueError(f"{len(adapters)} candidates, {len(teacher)} teacher completions for {len(prompts)} prompts")
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    students, bare, completions = dict(students or {}), None, {}
    for name, adapter_dir in adapters.items():
        if name in students and bare is not None:
            completions[name] = list(students[name])
            continue
        model, tokenizer = load_for_generation(new_model_dir, adapter_dir, dtype=dtype)
        completions[name] = list(students[name]) if name in students else greedy_completions(model, tokenizer,
                                                                                            prompts, **gen)
        if bare is None:
            with model.disable_adapter():
                bare = greedy_completions(model, tokenizer, prompts, **gen)
        del model
    tasks = [getattr(p, "task", None) for p in prompts]
    bare_flags = agreement_flags(bare, teacher, tasks)
    bare_agreement = sum(bare_flags) / len(bare_flags)
    result = []
    for name, student in completions.items():
        scores: dict[str, Any] = {}
        if answers is not None:
            scores = {"student_accuracy": accuracy(student, answers), "bare_accuracy": accuracy(bare, answers),
                      "teacher_accuracy": accuracy(teacher, answers)}
        flags = agreement_flags(student, teacher, tasks)
        gate = gate_decision(sum(flags) / len(flags), bare_agreement, n=len(prompts), margin=margin, **scores)
        result.append(Candidate(name, gate, (fidelity or {}).get(name), tuple(flags)))
        log.info("route candidate %s", result[-1].numbers())
    return result
