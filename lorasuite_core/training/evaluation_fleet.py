"""Evaluation of several adapters of one base model on one load (a fleet's evaluation rows).

:func:`evaluate_adapters` is :func:`~lorasuite_core.training.evaluation.evaluate` for every adapter at once: the base
is loaded once with every adapter attached and each adapter gets a pass of its own (``set_adapter``; the bare rows with
the adapters disabled): the batches of its own ``evaluate``, so each result equals it bit for bit.  ``mixed=True`` puts
every adapter's rows in shared batches (PEFT mixed-adapter batches, ``"__base__"`` for the bare rows): equal in float32
on a CPU (``tests/test_mixed_teachers.py``) but measured slower there (benchmarks/TEACHER_BATCH.md), so not the default.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from lorasuite_core.training.devices import resolve_device
from lorasuite_core.training.evaluation import (EVAL, EvalResult, GenerationStats, _summarise, eval_dtype,
                                                greedy_generate_ids, load_adapters_for_generation,
                                                load_for_generation)
from lorasuite_core.training.task_data import Sample, format_prompt


def evaluate_adapters(model_dir: str | Path, samples: Sequence[Sample], adapters: dict[str, str | Path | None], *,
                      batch_size: int = EVAL.batch_size, max_new_tokens: int | None = EVAL.max_new_tokens,
                      dtype: str = EVAL.dtype, device: str = EVAL.device,
                      mixed: bool = False) -> dict[str, EvalResult]:
    """:func:`evaluate` of every adapter of ``adapters`` (name -> directory; None: the bare model) on one base model
    loaded once, a pass per adapter (module docstring).  ``mixed``: every adapter's rows share the length-sorted
    batches instead (PEFT mixed-adapter batches), which equals the passes only where a greedy row does not depend on
    the rows beside it (float32 on a CPU; bf16 kernels round differently for other batch shapes) and is slower on a
    CPU.  ``seconds``, memory and the generation counters are the shared run's."""
    from lorasuite_core.training.skills import skill_of

    if not samples or not adapters:
        raise ValueError("no evaluation samples or no adapters given")
    start = time.perf_counter()
    keys = list(adapters)
    peft_names = {key: f"a{k}" for k, key in enumerate(keys) if adapters[key] is not None}
    resolved = eval_dtype(dtype, resolve_device(device))
    model, tokenizer = (load_adapters_for_generation(model_dir, {peft_names[k]: adapters[k] for k in peft_names},
                                                     dtype=resolved, device=device) if peft_names
                        else load_for_generation(model_dir, dtype=resolved, device=device))
    mixed = mixed and len(keys) > 1 and bool(peft_names)
    stats = GenerationStats()
    predictions: dict[str, list] = {key: [None] * len(samples) for key in keys}
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(skill_of(sample).name, []).append(index)
    for indices in groups.values():   # one pass per skill, every adapter's rows together
        skill = skill_of(samples[indices[0]])
        budget = max_new_tokens or skill.max_new_tokens
        for part in [keys] if mixed else [[key] for key in keys]:
            rows = [(key, i) for key in part for i in indices]
            if not mixed and part[0] in peft_names:
                model.set_adapter(peft_names[part[0]])
            bare = not mixed and part[0] not in peft_names and bool(peft_names)
            with model.disable_adapter() if bare else contextlib.nullcontext():
                ids = greedy_generate_ids(model, tokenizer, [format_prompt(samples[i]) for _, i in rows],
                                          max_new_tokens=budget, batch_size=batch_size, stop=skill.finished,
                                          stats=stats, adapter_names=[peft_names.get(key, "__base__")
                                                                      for key, _ in rows] if mixed else None)
            for (key, i), generation in zip(rows, tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True):
                predictions[key][i] = skill.score(i, generation, samples[i])
    results = {}
    for key in keys:
        result = _summarise(predictions[key], start, model, keep_predictions=True)
        result.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        result.batch_size, result.generation = batch_size, asdict(stats)
        results[key] = result
    return results
