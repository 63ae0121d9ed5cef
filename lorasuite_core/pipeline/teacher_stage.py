"""The ``teacher`` stage: the old model + the source adapter answers every prompt its consumers ask, once per adapter,
and a fleet's adapters answer on one load of the shared old base.

Design
------
Consumers: distilled LFT (``lft`` and ``fresh_lft`` with ``lft_mode`` distill: the training targets and the held-out
answers), ``fidelity`` (the held-out answers it scores, kept in its entry for ``route``) and the ``gate`` (the same
held-out answers).  Each reads this stage's entry (:func:`read_teacher`) instead of loading the old base and
generating.  The entry, keyed by :func:`~lorasuite_core.pipeline.plans._teacher_key` (the old model, the source
adapter's content fingerprint, the prompts as picked below, the greedy rules' version and the dtype/device),
holds JSON only (:mod:`lorasuite_core.training.heldout`; text and the teacher's token ids):

* ``teacher_targets.json``: distillation's training prompts and the teacher's completions (only where an LFT distils);
* ``heldout_prompts.json``: the held-out prompts and the teacher's completions on them.

Prompts (:func:`teacher_prompts`), exactly what the consumers picked before this stage existed:

* an LFT distils: ``lft_samples`` prompts from ``--lft-prompts`` (else ``--lft-data``), or synthesised from the seed
  prompts by the old base model (float32, no adapter: :func:`~lorasuite_core.training.prompts.synthesise_prompts`,
  the evaluation prompts excluded); held out: the evaluation data's first ``gate_prompts`` when given (then all of
  the prompts train), else ``gate_prompts`` of them drawn by
  :func:`~lorasuite_core.training.prompts.split_heldout` (``lft_samples + gate_prompts`` prompts read);
* otherwise only held-out prompts: the evaluation data's first ``gate_prompts``, else the first ``gate_prompts``
  calibration texts cut to :data:`FIDELITY_PROMPT_CHARS` (fidelity; the teacher continues them).

Self-consistency (``lft_consistency`` K; :mod:`~lorasuite_core.training.consistency`): the teacher also samples K
answers per *training* prompt (temperature 0.7, the adapter's seed, one pass per adapter on the greedy answers' own
base load, ``teacher_completions(then=...)``); a training prompt and its target are kept only where at least half of the
samples agree with the greedy answer.  The held-out prompts are never filtered.  The entry's facts give the kept and
dropped counts and the mean agreement.

Generation: :func:`~lorasuite_core.training.distill.greedy_completions`'s rules (each prompt's skill: stop rule,
budget, cut), :data:`GENERATION` (batches of 16 rows, the skills' budgets) in the adapter's generation dtype
(``generation_dtype``, :func:`~lorasuite_core.pipeline.plans.generation_dtype`: "auto" is bf16 where the hardware
has it), which the key holds (:func:`~lorasuite_core.pipeline.plans.teacher_compute`) and the entry's facts record.
Prompt synthesis (sampling from the old base, no adapter) stays float32.

Batched over a fleet (:func:`teacher_batch`, the graph's ``batch``): the runner hands one call the entries of a
level whose teacher stage runs, grouped by old model, at most :data:`MAX_ADAPTERS` adapters a call.  The call
reuses every complete entry and answers the others in ONE
:func:`~lorasuite_core.training.distill.teacher_completions` per generation dtype (one, unless a fleet's entries
ask for different ones): one old base holding every adapter, each adapter's
prompts in a pass of its own, the batches it gets alone, so an entry is the same computed alone or in a fleet, in
any dtype, and a rerun or a single-adapter migration reuses it.  PEFT's mixed-adapter batches (rows of different
adapters side by side, ``mixed=True``) give the same answers in float32 but were measured slower on this CPU:
4 SmolLM2 adapters x 32 prompts, 1 thread, 0.82x one pass per adapter where the batches really mix
(benchmarks/TEACHER_BATCH.md), so the stage does not use them.  Each adapter's answers go to its own entry
(:meth:`StageStore.run`); the generation's seconds are shared out evenly over the entries it computed (the
report's ``steps``).

Memory: the base weights, every adapter's factors and one batch's KV cache (16 rows, whatever the number of
adapters), hence the cap on adapters per call rather than on rows.  Failures: preparing one entry's prompts
(a bad prompt file, a missing adapter) fails that entry only; the shared generation failing fails the call, which
the one retry layer retries (a Prefect task's retries), then every entry of its group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io import terminal
from lorasuite_core.models.loading import resolve_local_dir
from lorasuite_core.pipeline.plans import AdapterPlan, PairPlan, calibration_texts, generation_dtype
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.stages import _heldout_eval
from lorasuite_core.training.heldout import HELDOUT, TEACHER_TARGETS, read_heldout, write_heldout

STAGE = "teacher"
#: Characters of a calibration text kept as a fidelity prompt (the teacher then continues it).
FIDELITY_PROMPT_CHARS = 400
#: Greedy generation as every consumer ran it: 16 rows a batch, each prompt's skill budget.
GENERATION: dict[str, Any] = {"batch_size": 16, "max_new_tokens": None}
#: Adapters held by the old base in one call (memory: base + their factors + one 16-row batch's KV cache).
MAX_ADAPTERS = 16


@dataclass
class TeacherPrompts:
    """What one adapter's teacher answers: distillation's training prompts (None: nothing distils) and held out."""

    train: list | None
    heldout: list
    source: str              # "file" | "synthesised" (distillation), "evaluation data", "calibration texts"
    dropped: int | None = None   # ``lft_dedup``: duplicate prompts dropped (None: not de-duplicated)
    consistency: int | None = None   # ``lft_consistency``: K samples per training prompt (None: no filter)

    @property
    def all(self) -> list:
        return list(self.train or []) + list(self.heldout)


def distils(adapter: AdapterPlan) -> bool:
    """An LFT of this adapter distils from the teacher (its ``lft`` or ``fresh_lft``)."""
    return adapter.options.lft_mode == "distill" and (adapter.lft is not None or adapter.fresh_lft is not None)


def teacher_prompts(plan: PairPlan, adapter: AdapterPlan, writer: Callable[[], tuple] | None = None) -> TeacherPrompts:
    """The prompts of the module docstring; ``writer()``: the old base model and tokenizer that synthesise prompts
    from seeds (default: loaded here, float32, no adapter)."""
    from lorasuite_core.training import prompts as P

    o = adapter.options
    heldout, _ = _heldout_eval(o)
    if not distils(adapter):
        if heldout:
            return TeacherPrompts(None, heldout, "evaluation data")
        texts = calibration_texts(plan.calibration_data, plan.max_calibration_tokens)[:o.gate_prompts]
        return TeacherPrompts(None, [P.Prompt(text[:FIDELITY_PROMPT_CHARS]) for text in texts], "calibration texts")
    wanted = o.lft_samples + (0 if heldout else o.gate_prompts)
    if o.synthesises_prompts:
        model, tokenizer = (writer or _writer(plan))()      # the writer: the teacher's base
        seeds = P.load_prompts(o.lft_seed_prompts, None, o.seed)
        prompts = P.synthesise_prompts(model, tokenizer, seeds, wanted, seed=o.seed, exclude=[p.text for p in heldout])
        source = "synthesised"
    else:
        prompts, source = P.load_prompts(o.lft_prompts or o.lft_data, wanted, o.seed), "file"
    dropped = None
    if o.lft_dedup:                 # before the held-out split: no repeats, no held-out evaluation prompt trained on
        kept = P.deduplicate(prompts, exclude=heldout)
        prompts, dropped = kept, len(prompts) - len(kept)
    if heldout:
        return TeacherPrompts(prompts[:o.lft_samples], heldout, source, dropped, o.lft_consistency)
    if len(prompts) <= o.gate_prompts:
        raise LorasuiteError(f"distillation: {len(prompts)} prompts, but {o.gate_prompts} are held out "
                             f"(--gate-prompts) and at least one must be left to train on")
    train, heldout = P.split_heldout(prompts, o.gate_prompts, o.seed)
    return TeacherPrompts(train, heldout, source, dropped, o.lft_consistency)


def _writer(plan: PairPlan) -> Callable[[], tuple]:
    """The old base model for prompt synthesis, loaded at the first call and kept for the next (one call's life)."""
    loaded: list = []

    def get() -> tuple:
        if not loaded:
            from lorasuite_core.training.distill import load_for_generation

            loaded.append(load_for_generation(resolve_local_dir(plan.old_model, "model"), dtype="float32"))
        return loaded[0]
    return get


# --------------------------------------------------------------------------- the stage


def teacher(store: StageStore, plan: PairPlan, adapter: AdapterPlan) -> StageResult:
    """One adapter's teacher entry: :func:`teacher_batch` of one."""
    [result] = teacher_batch(store, plan, [adapter])
    if isinstance(result, BaseException):
        raise result
    return result


def teacher_batch(store: StageStore, plan: PairPlan, adapters: list[AdapterPlan]) -> list[StageResult | BaseException]:
    """Every adapter's teacher entry (old model ``plan.old_model``), in order: reused where complete, else answered
    in one generation on one base load per generation dtype; an entry whose prompts could not be prepared gets its
    error in its place."""
    from lorasuite_core.training.distill import teacher_completions

    if len(adapters) > MAX_ADAPTERS:
        raise ValueError(f"{len(adapters)} adapters in one teacher call; at most {MAX_ADAPTERS}")
    results: list[StageResult | BaseException | None] = [None] * len(adapters)
    todo: dict[int, tuple[TeacherPrompts, Path]] = {}
    writer = _writer(plan)
    for i, adapter in enumerate(adapters):
        if store.problem(store.location(STAGE, adapter.teacher_key)) is None:
            results[i] = store.run(STAGE, adapter.teacher_key, _absent)        # complete: reused
            continue
        try:
            todo[i] = (teacher_prompts(plan, adapter, writer), resolve_local_dir(adapter.adapter, "adapter"))
        except Exception as error:  # noqa: BLE001 - this entry fails, the others go on
            results[i] = error
    del writer
    by_dtype: dict[str, dict[int, tuple[TeacherPrompts, Path]]] = {}
    for i, job in todo.items():             # a fleet's entries may ask for different generation dtypes
        by_dtype.setdefault(generation_dtype(adapters[i].options), {})[i] = job
    for dtype, jobs in by_dtype.items():
        start = time.perf_counter()
        with terminal.computing(STAGE):
            sampled: dict[str, list[list]] = {}
            answers = teacher_completions(resolve_local_dir(plan.old_model, "model"),
                                          {f"a{i}": (adapter_dir, prompts.all) for i, (prompts, adapter_dir)
                                           in jobs.items()}, **GENERATION, dtype=dtype,
                                          then=_consistency_samples(adapters, jobs, sampled))
        share = (time.perf_counter() - start) / len(jobs)
        for i, (prompts, _) in jobs.items():
            try:
                results[i] = store.run(STAGE, adapters[i].teacher_key,
                                       _writes(prompts, answers[f"a{i}"], len(jobs), sampled.get(f"a{i}"), dtype),
                                       prior_seconds=share)
            except Exception as error:  # noqa: BLE001 - this entry fails, the others go on
                results[i] = error
    return results  # type: ignore[return-value]


def _absent(out: Path) -> dict:
    raise LorasuiteError(f"teacher entry vanished from the store while in use ({out})")


def _consistency_samples(adapters: list[AdapterPlan], todo: dict[int, tuple[TeacherPrompts, Path]],
                         into: dict[str, list[list]]) -> Callable[[Any, Any], None] | None:
    """The self-consistency sampling of the entries that filter (``lft_consistency``), to run on the teacher
    generation's own base load (``then``); the samples go ``into`` the given dict.  None: no entry filters."""
    from lorasuite_core.training.consistency import teacher_samples

    jobs = {f"a{i}": (prompts.train, prompts.consistency, adapters[i].options.seed)
            for i, (prompts, _) in todo.items() if prompts.consistency and prompts.train}
    if not jobs:
        return None
    return lambda model, tokenizer: into.update(teacher_samples(model, tokenizer, jobs,
                                                                batch_size=GENERATION["batch_size"]))


def _filtered(prompts: TeacherPrompts, targets: list, samples: list[list]) -> tuple[list, list, dict[str, Any]]:
    """The training prompts and targets the consistency filter keeps, and its facts."""
    from lorasuite_core.training.consistency import MIN_AGREEMENT, TEMPERATURE, consistency

    scores = consistency(targets, samples, prompts.train)
    keep = [j for j, c in enumerate(scores) if c >= MIN_AGREEMENT]
    if not keep:
        raise LorasuiteError(f"self-consistency filter (--lft-consistency {prompts.consistency}): the teacher agreed "
                             f"with its greedy answer on under half of its samples for every one of the "
                             f"{len(scores)} training prompts; nothing left to distil")
    facts = {"k": prompts.consistency, "temperature": TEMPERATURE, "min_agreement": MIN_AGREEMENT,
             "kept": len(keep), "dropped": len(scores) - len(keep),
             "mean_agreement": round(sum(scores) / len(scores), 4)}
    return [prompts.train[j] for j in keep], [targets[j] for j in keep], facts


def _writes(prompts: TeacherPrompts, completions: list, adapters: int,
            samples: list[list] | None = None, dtype: str = "float32") -> Callable[[Path], dict]:
    def compute(out: Path) -> dict:
        n_train = len(prompts.train or [])
        train, targets, filtered = prompts.train, completions[:n_train], None
        if prompts.train is not None:
            if samples is not None:
                train, targets, filtered = _filtered(prompts, targets, samples)
            write_heldout(out / TEACHER_TARGETS, train, targets)
        write_heldout(out / HELDOUT, prompts.heldout, completions[n_train:])
        return {"prompts": "distillation" if prompts.train is not None else prompts.source,
                "prompt_source": prompts.source, "n_train": len(train or []), "n_heldout": len(prompts.heldout),
                "adapters_in_call": adapters, "dtype": dtype,
                **({"duplicate_prompts_dropped": prompts.dropped} if prompts.dropped is not None else {}),
                **({"consistency": filtered} if filtered is not None else {})}
    return compute


@dataclass
class TeacherAnswers:
    """A teacher entry read back: prompts and the teacher's completions (``train``/``targets``: None unless
    distillation's), and its facts."""

    train: list | None
    targets: list | None
    heldout: list
    heldout_teacher: list
    facts: dict[str, Any]


def read_teacher(store: StageStore, uri: str) -> TeacherAnswers:
    """The entry of :func:`teacher_batch` at ``uri`` (a malformed file: one LorasuiteError line)."""
    where = store.local_dir(uri)
    train = targets = None
    if (where / TEACHER_TARGETS).exists():
        train, targets, _ = read_heldout(where / TEACHER_TARGETS)
    heldout, heldout_teacher, _ = read_heldout(where / HELDOUT)
    if heldout_teacher is None or (train is not None and targets is None):
        raise LorasuiteError(f"teacher entry {where} holds prompts without the teacher's completions")
    return TeacherAnswers(train, targets, heldout, heldout_teacher, store.facts(uri))
