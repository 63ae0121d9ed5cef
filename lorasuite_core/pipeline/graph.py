"""The two stage graphs of a migration, declared once, as data; :mod:`.runner` walks them.

Design
------
A :class:`Stage` names its function (in :mod:`.pair_stages` or :mod:`.stages`), the stages whose entries it reads
(``inputs``, in the order of the function's arguments), when it runs (``when``, a predicate on the
:class:`~lorasuite_core.pipeline.plans.AdapterPlan`) and whether it fans out (``fan_out``: one
call per job of the plan).  The stage order of a migration is this file, top to bottom::

    plan_pair                            identities and keys          (plans.plan_pair)
    PAIR_GRAPH                           seven analysis stages, once per model pair, calibration set and
                                         head transform (the unit maps)
    per adapter:
      check_entry                        output safety + adapter check (runner.check_entry)
      plan_adapter                       load, fit check, jobs, keys   (plans.plan_adapter)
      ENTRY_GRAPH                        transfer ... eval (the route's candidates, its choice: :mod:`.routes`;
                                         the teacher's answers, once, for every consumer: :mod:`.teacher_stage`)
      publish(FINAL)                     copy to the output, report patched, manifest last

Routes (``--route``, :mod:`.routes`): each candidate route's adapter is an entry of its own stage
(``copy``, ``migrated`` / ``lft``, ``fresh_lft``); only the stages of the planned candidates run;
``fidelity`` scores every candidate that ran and ``route`` (``auto``) picks among them, so the stage
keys chain as for any other stage and a rerun reuses every finished candidate.

Calling convention: a pair stage is called ``fn(store, pair_plan, *inputs)``; an entry stage
``fn(store, pair_plan, adapter_plan, [job,] *inputs)``, where each input is the URI of the
upstream entry, a list of URIs for a fanned-out upstream, and ``None`` for an upstream that does
not run for this adapter.  An entry stage may read pair stages (``head_similarity``: the whole
:class:`~lorasuite_core.transfer.adapter.PairAnalysis`).  An input written as a tuple
(:data:`FINAL`) is the first of its stages that ran.

Teacher answers: the ``teacher`` stage (:mod:`.teacher_stage`) answers every prompt that distilled LFT
(``lft``, ``fresh_lft``), ``fidelity`` and the ``gate`` read, once per adapter; it follows assembly (a whole torch
model, see below) and precedes every consumer.

Batched stages: a stage with ``batch`` is one call for several entries, ``batch(store, pair_plan, items)`` -> one
result (or that item's error) per item, in order, at most ``batch_max`` items a call; each item still has its own
store entry and key (``fn`` computes one alone, equal to its place in a batch).  ``teacher``: the items are the
adapter plans of the level's entries that run it, grouped by old model (in a run: the pair's); it reads no entry
stage, so grouping never waits on one entry for another.  ``eval`` (fanned out): the items are ``(adapter_plan,
job, input)`` of every entry's evaluation rows, grouped by ``batch_key`` (the row's base model and evaluation
samples): one model load for the rows of a group (:func:`~lorasuite_core.training.evaluation_fleet.evaluate_adapters`).

Waves: the runner runs the entry graph level by level (a stage's level is one more than that of
the latest stage it reads or follows, ``after``), every live adapter's stages of a level before
waiting on any, so adapters and their layers run side by side.  Stages that load a whole torch
model (``torch_model``) never overlap the per-layer numerics: transformers sets process-global
torch defaults while it loads, which is why the vanilla baseline follows assembly and evaluation
follows the gate (an adapter that fails the gate is not evaluated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import pair_stages, route_stages, stages, teacher_stage
from .stage_store import StageResult
from .plans import AdapterPlan, EvalJob


@dataclass(frozen=True)
class Stage:
    """One node of a stage graph; see the module docstring."""

    fn: Callable[..., StageResult]
    inputs: tuple[str | tuple[str, ...], ...] = ()
    when: Callable[[AdapterPlan], bool] = lambda plan: True
    fan_out: Callable[[AdapterPlan], list] | None = None       # one call per job
    job_input: Callable[[Any], str | None] | None = None        # a fanned-out job's own input stage
    after: tuple[str, ...] = ()                                 # order only: runs after these
    step: str = ""                                              # the report's ``steps`` key
    task: str = ""                                              # the task's (and store entry's) name
    run_name: str | None = None                                 # a pattern over the task's arguments
    gpu: bool = False                                           # tagged for accelerator workers
    torch_model: bool = False                                   # loads a whole torch model (one at a time)
    batch: Callable[..., list] | None = None                    # one call for several entries (module docstring)
    batch_max: int = 1                                          # entries per batch call at most
    batch_key: Callable[[AdapterPlan, Any], Any] | None = None  # a fanned-out job's group (None: not batched)


def _pair(fn, inputs=(), task="", **kw) -> Stage:
    return Stage(fn, inputs, step=fn.__name__, task=task or fn.__name__, **kw)


#: The pair analysis (adapter-independent): computed once per model pair and calibration set.
PAIR_GRAPH: dict[str, Stage] = {
    "vocabulary": _pair(pair_stages.vocabulary),
    "activations": _pair(pair_stages.activations, gpu=True, torch_model=True),
    "transfer_matrix": _pair(pair_stages.transfer_matrix, ("vocabulary",)),
    "cka": _pair(pair_stages.cka, ("activations",)),
    "layer_mapping": _pair(pair_stages.layer_mapping, ("cka",)),
    "head_similarity": _pair(pair_stages.head_similarity,
                             ("vocabulary", "transfer_matrix", "activations", "cka", "layer_mapping")),
    "unit_maps": _pair(pair_stages.unit_maps, ("head_similarity",)),
}
PAIR_STAGES = tuple(PAIR_GRAPH)

#: The adapter an entry publishes and the gate judges: the route's choice (``--route auto``), else the one
#: candidate's (routes.candidate_stages): its light fine-tune where one ran, else the migrated one, the
#: distilled fresh LoRA, or the copy.
FINAL = ("route", "lft", "migrated", "fresh_lft", "copy")


def _eval_base(plan: AdapterPlan, job: EvalJob) -> tuple:
    """Evaluation rows batched together: the same base model and evaluation samples."""
    o = plan.options
    return job.model, o.eval_data, o.eval_samples, o.seed


def _eval_adapter(job: EvalJob) -> str | None:
    """The stage whose entry an evaluation row loads (``source``: the entry's own adapter, no stage)."""
    return None if job.adapter in (None, "source") else job.adapter


#: Per adapter, after :func:`~lorasuite_core.pipeline.plans.plan_adapter` and before publishing :data:`FINAL`.
ENTRY_GRAPH: dict[str, Stage] = {
    "transfer": Stage(stages.transfer_layer, ("head_similarity", "unit_maps"), when=lambda plan: plan.transfers,
                      fan_out=lambda plan: plan.layers, step="transfer", task="layer",
                      run_name="transfer-{adapter.name}-layer-{job.new_layer}", gpu=True),
    "copy": Stage(route_stages.copy_adapter, (), when=lambda plan: plan.copy_key is not None, step="copy",
                  task="copy", run_name="copy-{adapter.name}"),
    "migrated": Stage(stages.assemble, ("head_similarity", "transfer"), when=lambda plan: plan.writes_migrated,
                      step="write", task="migrated", run_name="assemble-{adapter.name}"),
    "fresh": Stage(route_stages.fresh_start, ("transfer",), when=lambda plan: plan.fresh_key is not None,
                   step="fresh_start", task="fresh", run_name="fresh-start-{adapter.name}"),
    "teacher": Stage(teacher_stage.teacher, (), when=lambda plan: plan.teacher_key is not None, after=("migrated",),
                     step="teacher", task="teacher", run_name="teacher-{adapter.name}", gpu=True, torch_model=True,
                     batch=teacher_stage.teacher_batch, batch_max=teacher_stage.MAX_ADAPTERS),
    "lft": Stage(stages.light_finetune, ("migrated", "teacher"), when=lambda plan: plan.lft is not None, step="lft",
                 task="lft", run_name="lft-{adapter.name}", gpu=True, torch_model=True),
    "vanilla": Stage(stages.vanilla_baseline, (), when=lambda plan: plan.vanilla is not None, after=("migrated",),
                     step="vanilla_baseline", task="vanilla", run_name="vanilla-baseline-{adapter.name}",
                     gpu=True, torch_model=True),
    "fresh_lft": Stage(route_stages.fresh_distill, ("fresh", "teacher"), when=lambda plan: plan.fresh_lft is not None,
                       step="fresh_distill", task="fresh_lft", run_name="fresh-distill-{adapter.name}", gpu=True,
                       torch_model=True),
    "fidelity": Stage(stages.fidelity, ("migrated", "lft", "copy", "fresh_lft", "teacher"),
                      when=lambda plan: plan.fidelity_key is not None, step="fidelity", task="fidelity",
                      run_name="fidelity-{adapter.name}", gpu=True, torch_model=True),
    "route": Stage(route_stages.choose_route, ("copy", "migrated", "lft", "fresh_lft", "fidelity"),
                   when=lambda plan: plan.route_key is not None, step="route", task="route",
                   run_name="route-{adapter.name}", gpu=True, torch_model=True),
    "gate": Stage(stages.quality_gate, (FINAL, "teacher"), after=("fidelity",), when=lambda plan: plan.gate_key is not None, step="gate",
                  task="gate", run_name="quality-gate-{adapter.name}", gpu=True, torch_model=True),
    "eval": Stage(stages.evaluate, (), when=lambda plan: bool(plan.evals), fan_out=lambda plan: plan.evals,
                  job_input=_eval_adapter, after=("gate",), step="eval", task="eval",
                  run_name="eval-{adapter.name}-{job.label}", gpu=True, torch_model=True,
                  batch=stages.evaluate_batch, batch_max=stages.EVAL_BATCH_MAX, batch_key=_eval_base),
}
ENTRY_STAGES = tuple(ENTRY_GRAPH)


def upstream(stage: Stage) -> list[str]:
    """Every stage ``stage`` reads or follows (the alternatives of a tuple input included)."""
    names = [name for item in stage.inputs for name in ((item,) if isinstance(item, str) else item)]
    return names + list(stage.after)


def levels(graph: dict[str, Stage]) -> list[list[str]]:
    """The graph's stages by level (0: reads nothing of this graph); declaration order within a level."""
    level: dict[str, int] = {}
    for name, stage in graph.items():
        level[name] = 1 + max((level[u] for u in upstream(stage) if u in graph), default=-1)
    return [[n for n in graph if level[n] == k] for k in range(1 + max(level.values(), default=-1))]


def resolve_input(item: str | tuple[str, ...] | None, done: dict[str, Any], pair: dict[str, Any] | None = None) -> Any:
    """An input's value: the stage's result (a list for a fanned-out stage), the first of a tuple's
    stages that ran, or None where it did not run for this adapter (or ``item`` is None: no stage)."""
    for name in ((item,) if isinstance(item, str) else item or ()):
        if name in done:
            return done[name]
        if pair is not None and name in pair:
            return pair[name]
    return None


def as_uris(value: Any) -> Any:
    """Stage results handed on as their store URIs (lists element-wise, None kept)."""
    if isinstance(value, (list, tuple)):
        return [as_uris(v) for v in value]
    return value.uri if isinstance(value, StageResult) else value


def step(results: StageResult | list[StageResult]) -> dict[str, Any]:
    """A report step, ``{"cache": "computed" | "reused", "seconds"}``: per-layer and per-row parts summed."""
    results = results if isinstance(results, list) else [results]
    cache = "computed" if any(not r.reused for r in results) else "reused"
    return {"cache": cache, "seconds": round(sum(r.seconds for r in results), 4)}
