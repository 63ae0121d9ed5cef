"""The teacher's self-consistency: keep the distillation prompts whose answer the teacher gives reliably.

A distilled student learns the teacher's greedy answers, wrong ones included.  Where the teacher is unsure its greedy
answer is more often wrong, and the sign of unsureness needs no label: sampled at temperature ``T``, its answers
disagree with each other.  For a training prompt ``x`` with greedy answer ``g(x)`` and ``K`` answers ``s_1..s_K``
sampled from ``softmax(logits / T)`` (the same prompt template, stop rule, budget and cut as the greedy answer),

    c(x) = (1/K) * #{k : agree(s_k, g(x))}

where ``agree`` is the skill's scorer with ``g(x)`` as the reference (:func:`~lorasuite_core.training.agreement.
answers_agree`; prompts without a task: the final number).  A prompt trains only where ``c(x) >= MIN_AGREEMENT``
(at least half of the samples give the greedy answer); dropped prompts are not replaced.  The held-out prompts are
never filtered: they measure agreement with the teacher, whatever its confidence.

Sampling is :func:`~lorasuite_core.training.completions.greedy_completions` with a sampling next-token rule
(:func:`sampler`): each prompt repeated ``K`` times, drawn from one ``torch.Generator`` seeded with the run's seed,
so a rerun gives the same samples (the draws of a row depend on the rows beside it: each adapter is sampled in a pass
of its own, so a fleet and a single migration sample alike).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from lorasuite_core.training.prompts import Prompt

if TYPE_CHECKING:
    import torch

#: Sampling temperature of the consistency samples.
TEMPERATURE = 0.7
#: Share of the samples that must give the greedy answer for a prompt to train.
MIN_AGREEMENT = 0.5
#: Version of these rules in the teacher stage's key.
CONSISTENCY_VERSION = 1


def sampler(temperature: float, seed: int):
    """A next-token rule: one token per row drawn from ``softmax(logits / temperature)`` (float32), reproducibly."""
    import torch

    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    generators: dict[str, torch.Generator] = {}

    def pick(logits: torch.Tensor) -> torch.Tensor:
        key = str(logits.device)
        if key not in generators:
            generators[key] = torch.Generator(device=logits.device).manual_seed(seed)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generators[key])[:, 0]
    return pick


def sampled_completions(model, tokenizer, prompts: Sequence[Prompt], k: int, *, seed: int,
                        temperature: float = TEMPERATURE, batch_size: int = 16) -> list[list]:
    """``k`` sampled completions per prompt (:class:`~lorasuite_core.training.completions.Completion`), in order."""
    from lorasuite_core.training.completions import greedy_completions

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    repeated = [p for p in prompts for _ in range(k)]
    flat = greedy_completions(model, tokenizer, repeated, batch_size=batch_size, pick=sampler(temperature, seed))
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def consistency(greedy: Sequence, samples: Sequence[Sequence], prompts: Sequence[Prompt]) -> list[float]:
    """``c(x)`` of the module docstring per prompt: the share of its samples that agree with its greedy answer."""
    from lorasuite_core.training.agreement import answers_agree

    if not len(greedy) == len(samples) == len(prompts):
        raise ValueError(f"{len(greedy)} greedy answers, {len(samples)} sample lists, {len(prompts)} prompts")
    return [sum(answers_agree(s, g, p.task) for s in drawn) / len(drawn) if drawn else 0.0
            for g, drawn, p in zip(greedy, samples, prompts)]


def teacher_samples(model, tokenizer, jobs: dict[str, tuple[Sequence[Prompt], int, int]], *,
                    batch_size: int = 16) -> dict[str, list[list]]:
    """Every adapter's samples on a loaded base holding them all under their names (the teacher stage's load, from
    :func:`~lorasuite_core.training.completions.teacher_completions`): name -> (prompts, K, seed) gives K samples
    per prompt.  Each adapter is sampled in a pass of its own (``set_adapter``) from a generator seeded with its
    seed, so its samples do not depend on the other adapters of the call."""
    result = {}
    for name, (prompts, k, seed) in jobs.items():
        model.set_adapter(name)
        result[name] = sampled_completions(model, tokenizer, prompts, k, seed=seed, batch_size=batch_size)
    return result
