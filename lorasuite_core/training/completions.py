"""Greedy completions of prompts in the built-in template, kept with their token ids (the teacher's and the student's
answers that distillation, fidelity, the gate and the route read).

* :func:`greedy_completions` -- evaluation's greedy loop (:func:`~lorasuite_core.training.evaluation.greedy_generate_ids`)
  per task: a prompt of a registered skill (``Prompt.task``) with that skill's stop rule, budget and cut
  (:meth:`~lorasuite_core.training.skills.base.Skill.target_text`); a prompt without a task up to
  :data:`DEFAULT_MAX_NEW_TOKENS`, cut after the first complete "The answer is N" sentence.  A completion keeps the
  generator's *token ids* for exactly its text: decoding then re-encoding is lossy (byte tokens of partial UTF-8
  characters decode to U+FFFD).
* :func:`teacher_completions` -- several adapters of one old model on one base load, a pass per adapter (PEFT
  mixed-adapter batches on request: equal in float32 on a CPU, but slower there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lorasuite_core.training.agreement import _skill, scored_text
from lorasuite_core.training.evaluation import generation_finished, model_eos_ids
from lorasuite_core.training.prompts import Prompt


# --------------------------------------------------------------------------- loading and generation

@dataclass(frozen=True)
class Completion:
    """A scored generation: its text and the generator's token ids for exactly that text (no EOS)."""

    text: str
    ids: tuple[int, ...]


def _cut_ids(tokenizer, ids: list[int], text: str) -> tuple[int, ...]:
    """Shortest prefix of ``ids`` whose decoding covers ``text`` (decoding is not monotone: scan)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip()) >= len(text):
            return tuple(ids[:k])
    return tuple(ids)


#: Token budget of a prompt without a task (a registered skill's prompt uses the skill's ``max_new_tokens``).
DEFAULT_MAX_NEW_TOKENS = 128


def _completion(tokenizer, row: list[int], stop_ids: set[int], cut=scored_text) -> Completion:
    end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
    ids = row[:end]
    text = cut(tokenizer.decode(ids, skip_special_tokens=True))
    return Completion(text=text, ids=_cut_ids(tokenizer, ids, text))


def greedy_completions(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int | None = None,
                       batch_size: int = 16, adapter_names: Sequence[str] | None = None,
                       pick=None) -> list[Completion]:
    """Greedy completions of ``prompts`` in the built-in template: evaluation's greedy loop
    (:func:`~lorasuite_core.training.evaluation.greedy_generate_ids`: length-sorted batches, KV cache,
    a row leaves its batch once its text is fully scored), cut and kept with their token ids.
    Prompts are generated per task (``Prompt.task``): with the skill's stop rule, cut and, unless
    ``max_new_tokens`` is given, its budget; without a task, the final-number rules and
    :data:`DEFAULT_MAX_NEW_TOKENS`.
    ``adapter_names``: one per prompt, for a model holding several adapters (mixed-adapter batches).
    ``pick``: the next-token rule (default argmax; a sampler: :mod:`~lorasuite_core.training.consistency`)."""
    from lorasuite_core.training.evaluation import greedy_generate_ids

    if (max_new_tokens is not None and max_new_tokens < 1) or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    eos = model_eos_ids(model, tokenizer)
    stop_ids = set(eos) | {tokenizer.pad_token_id}
    groups: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt.task, []).append(index)
    result: list[Completion | None] = [None] * len(prompts)
    for task, indices in groups.items():   # one pass per task: its stop rule, budget and cut
        skill = _skill(task)
        budget = max_new_tokens or (skill.max_new_tokens if skill else DEFAULT_MAX_NEW_TOKENS)
        rows = greedy_generate_ids(model, tokenizer, [prompts[i].formatted() for i in indices],
                                   max_new_tokens=budget, batch_size=batch_size,
                                   stop=skill.finished if skill else generation_finished, eos_token_ids=eos,
                                   adapter_names=None if adapter_names is None else [adapter_names[i] for i in indices],
                                   pick=pick)
        for i, row in zip(indices, rows, strict=True):
            result[i] = _completion(tokenizer, row, stop_ids, skill.target_text if skill else scored_text)
    return result  # type: ignore[return-value]


def teacher_completions(old_model_dir: str | Path, prompts_by_adapter: dict[str, tuple[str | Path, Sequence[Prompt]]],
                        *, max_new_tokens: int | None = None, batch_size: int = 16, dtype: str = "auto",
                        device: str = "auto", mixed: bool = False,
                        then: Callable[[Any, Any], None] | None = None) -> dict[str, list[Completion]]:
    """Every teacher's greedy completions on one base load: name -> (adapter directory, prompts) of adapters of one
    old model.  By default each adapter's prompts are generated in a pass of its own (``set_adapter``): the batches
    it gets alone, so its completions equal :func:`greedy_completions` with it loaded alone, bit for bit, in any
    dtype.  ``mixed=True`` puts rows of different adapters side by side in the batches (PEFT mixed-adapter batches,
    one decode step for all of them); that too equals one adapter at a time where a greedy row does not depend on
    the rows beside it (float32 on a CPU, ``tests/test_mixed_teachers.py``; bf16 kernels round differently for other
    batch shapes), but on a CPU it was measured slower (benchmarks/TEACHER_BATCH.md: decode there is bound by
    compute, not by reading the weights, and PEFT routes each adapter's rows separately), so nothing uses it by
    default.

    ``then(model, tokenizer)``, where given, runs on the same load after the greedy passes (the teacher stage samples
    its self-consistency answers there), so the old base is loaded once."""
    from lorasuite_core.training.evaluation import load_adapters_for_generation

    model, tokenizer = load_adapters_for_generation(
        old_model_dir, {name: adapter for name, (adapter, _) in prompts_by_adapter.items()}, dtype=dtype, device=device)
    gen = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    if not mixed or len(prompts_by_adapter) == 1:
        result = {}
        for name, (_, prompts) in prompts_by_adapter.items():
            model.set_adapter(name)
            result[name] = greedy_completions(model, tokenizer, prompts, **gen)
    else:
        prompts = [p for _, ps in prompts_by_adapter.values() for p in ps]
        names = [name for name, (_, ps) in prompts_by_adapter.items() for _ in ps]
        completions = greedy_completions(model, tokenizer, prompts, adapter_names=names, **gen)
        result = {name: [] for name in prompts_by_adapter}
        for name, completion in zip(names, completions, strict=True):
            result[name].append(completion)
    if then is not None:
        then(model, tokenizer)
    return result
