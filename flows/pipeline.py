"""Orchestration shared by the flows: the pair analysis once, then adapters fanned out in waves.

Design
------
* :class:`PipelineRun` holds one flow run's cache root (see :mod:`flows.settings`) and
  calls the tasks of :mod:`tasks` directly.
* :meth:`PipelineRun.analyse_pair` identifies the pair, submits the six analysis tasks as a
  graph (the vocabulary/transfer-matrix branch runs beside the activations/CKA/mapping branch),
  waits, and creates the analysis artifacts.  A failing stage fails the flow: without the pair
  analysis no adapter can move.
* :meth:`PipelineRun.migrate` advances every adapter entry through the same waves — ``load``
  (plan + fit check), ``transfer`` (``transfer_layer.map`` over the adapter's new layers),
  ``write`` (assemble), ``train`` (LFT / vanilla baseline, if asked), ``eval`` (if data),
  ``publish``.  A wave submits the work of all live entries before waiting on any, so entries
  (and the layers of each) run side by side on the task runner.  A failure fails only its
  entry, with the stage and the error's message; the other entries go on.
* Report ``steps``: per stage ``{"cache": "computed" | "reused", "seconds"}``.  Reused means a
  complete, verified store entry found by the stage itself.  Seconds: the time spent inside the
  stage in this run — computing, or finding, verifying and reading its stored output.  Orchestration
  overhead is not counted.  Per-layer and per-row parts are summed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from prefect import get_run_logger, unmapped
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel

import tasks
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import FleetManifest
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.stages import (ENTRY_WAVES, PAIR_GRAPH, PAIR_STAGES, AdapterPlan, PairPlan, cka_of_updates,
                                            report_updates, run_inputs)
from lorasuite_core.io.outputs import check_replaceable
from lorasuite_core.io.uris import describe_error, redact_uri

from . import artifacts
from .settings import resolve_cache_root

ENTRY_STEPS = ("transfer", "write", "lft", "vanilla_baseline", "fidelity", "gate", "eval")


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Part:
    cache: str      # "computed" | "reused"
    seconds: float


def combine(parts: Iterable[Part]) -> dict[str, Any]:
    parts = list(parts)
    cache = "computed" if any(p.cache == "computed" for p in parts) else "reused"
    return {"cache": cache, "seconds": round(sum(p.seconds for p in parts), 4)}


def outcome(future: PrefectFuture) -> tuple[Part, Any]:
    """The future's result (raising its exception on failure) and how this run obtained it."""
    result = future.result()
    if isinstance(result, StageResult):
        return Part("reused" if result.reused else "computed", round(result.seconds, 4)), result
    return Part("computed", round(getattr(result, "seconds", 0.0), 4)), result


# --------------------------------------------------------------------------- entries and results


class EntryResult(BaseModel):
    name: str
    adapter: str
    output: str
    status: str                      # published | skipped | failed
    error: str | None = None         # failed: "<stage>: <message>"
    note: str | None = None          # skipped: why
    summary: dict[str, Any] = {}


class FleetResult(BaseModel):
    old_model: str
    new_model: str
    analysis: dict[str, Any] = {}
    entries: list[EntryResult] = []
    note: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "old_model": redact_uri(self.old_model), "new_model": redact_uri(self.new_model),
            "analysis": self.analysis, "note": self.note,
            "published": [e.name for e in self.entries if e.status == "published"],
            "skipped": [{"name": e.name, "note": e.note} for e in self.entries if e.status == "skipped"],
            "failed": [{"name": e.name, "error": e.error} for e in self.entries if e.status == "failed"],
            "entries": [e.model_dump() for e in self.entries],
        }


@dataclass
class EntryRun:
    """One adapter's way through the waves."""

    name: str
    adapter: str
    output: str
    options: MigrationOptions
    status: str = "running"
    error: str | None = None
    note: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    plan: AdapterPlan | None = None
    stored: dict[str, StageResult] = field(default_factory=dict)   # "migrated", "lft", "vanilla"
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: dict[str, list[Part]] = field(default_factory=lambda: defaultdict(list))
    waves: int = 0
    published: str | None = None

    @property
    def live(self) -> bool:
        return self.status == "running"

    def fail(self, step: str, error: BaseException) -> None:
        message = str(error) if isinstance(error, (LorasuiteError, LayerError)) else describe_error(error)
        cause = error.cause if isinstance(error, LayerError) else error
        self.status, self.error, self.exception = "failed", f"{step}: {message}", cause

    def planned_waves(self) -> int:
        plan = self.plan
        train = bool(plan and (plan.lft or plan.vanilla))
        return 4 + int(train) + int(bool(plan and plan.fidelity_key)) + int(bool(plan and plan.gate_key)) \
            + int(bool(plan and plan.evals))

    def progress(self) -> float:
        return 1.0 if not self.live else min(1.0, self.waves / self.planned_waves())

    def steps(self, pair_steps: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        steps = {"load": combine(self.parts["load"]), **pair_steps}
        steps.update({step: combine(self.parts[step]) for step in ENTRY_STEPS if self.parts.get(step)})
        return steps

    def result(self, summary: dict[str, Any] | None = None) -> EntryResult:
        return EntryResult(name=self.name, adapter=redact_uri(self.adapter), output=redact_uri(self.output),
                           status=self.status, error=self.error, note=self.note, summary=summary or {})


@dataclass
class PairRun:
    plan: PairPlan
    results: dict[str, StageResult]
    steps: dict[str, dict[str, Any]]

    @property
    def analysis(self) -> StageResult:
        return self.results["head_similarity"]


# --------------------------------------------------------------------------- the run


class PipelineRun:
    """One flow run's storage, and configured tasks; see the module docstring."""

    def __init__(self, cache_root: str | None):
        self.store = resolve_cache_root(cache_root)
        self.t = tasks
        self.log = get_run_logger()
        self.log.info("stage store: %s", redact_uri(self.store))

    # ----------------------------------------------------------------- pair analysis

    def analyse_pair(self, old_model: str, new_model: str, analysis: AnalysisOptions,
                     on_progress: Callable[[int, int], None] | None = None) -> PairRun:
        """Submit the stages of ``PAIR_GRAPH``; ``on_progress(done, total)`` as each finishes."""
        s = self.store
        plan = self.t.identify_pair(old_model, new_model, analysis)
        f: dict[str, PrefectFuture] = {}
        for stage, upstream in PAIR_GRAPH.items():
            f[stage] = self.t.PAIR_TASKS[stage].submit(s, plan, *(f[u] for u in upstream))
        if on_progress:
            for done, _ in enumerate(as_completed(list(f.values())), start=1):
                on_progress(done, len(PAIR_STAGES))
        results, steps = {}, {}
        for stage in PAIR_STAGES:
            part, results[stage] = outcome(f[stage])
            steps[stage] = combine([part])
        reused = [stage for stage in PAIR_STAGES if steps[stage]["cache"] == "reused"]
        self.log.info("pair analysis: %d/%d stages reused (%s)", len(reused), len(PAIR_STAGES), ", ".join(reused) or "none")
        cka = cka_of_updates(StageStore.at(self.store), results["cka"].uri)
        artifacts.analysis_artifacts(old_model, new_model, cka, results["layer_mapping"], results["head_similarity"],
                                     new_heads=plan.new().dims.num_heads,   # config only (weights are lazy)
                                     new_layers=plan.new().dims.num_layers)
        return PairRun(plan, results, steps)

    # ----------------------------------------------------------------- entries

    def check_outputs(self, entries: list[EntryRun], overwrite: bool, fleet: FleetManifest,
                      cache_root: str | None) -> None:
        """Fleet rule: a finished publication is skipped unless ``overwrite`` (idempotent reruns);
        an unsafe output or foreign content fails the entry; an interrupted publication of ours is redone."""
        futures = {e.name: self.t.check_output.submit(
            e.output, run_inputs(fleet.old_model, fleet.new_model, e.adapter, e.options,
                                 fleet.analysis, cache_root)) for e in entries}
        for e in entries:
            try:
                status = futures[e.name].result()
                if status == "complete" and not overwrite:
                    e.status, e.note = "skipped", f"already published at {redact_uri(e.output)} (pass overwrite to redo)"
                    continue
                check_replaceable(e.output, status, overwrite)
            except Exception as error:  # noqa: BLE001 - recorded on the entry
                e.fail("output", error)

    def migrate(self, entries: list[EntryRun], pair: PairRun, *, overwrite: bool,
                on_progress: Callable[[float], None] | None = None) -> None:
        submitters = {"load": self._plan, "transfer": self._transfer, "write": self._assemble,
                      "train": self._train, "fidelity": self._fidelity, "gate": self._gate, "eval": self._evaluate,
                      "publish": lambda e, p: self._publish(e, p, overwrite)}
        for step in ENTRY_WAVES:
            self._wave(entries, pair, step, submitters[step])
            if on_progress:
                on_progress(100.0 * sum(e.progress() for e in entries) / len(entries))
        for e in entries:
            if e.status == "failed":
                self.log.error("adapter %s failed at %s", e.name, e.error)

    def _wave(self, entries: list[EntryRun], pair: PairRun, step: str,
              submit: Callable[[EntryRun, PairRun], Callable[[], None] | None]) -> None:
        collectors = {}
        for e in entries:
            if e.live:
                try:
                    collectors[e.name] = submit(e, pair)
                except Exception as error:  # noqa: BLE001 - a submission error fails this entry only
                    e.fail(step, error)
        for e in entries:
            collect = collectors.get(e.name)
            if collect is None or not e.live:
                continue
            try:
                collect()
                e.waves += 1
            except Exception as error:  # noqa: BLE001 - recorded on the entry
                e.fail(step, error)

    def _plan(self, e: EntryRun, pair: PairRun):
        future = self.t.plan_adapter.submit(pair.plan, pair.analysis, e.name, e.adapter, e.options)

        def collect():
            part, e.plan = outcome(future)
            e.parts["load"].append(part)
        return collect

    def _transfer(self, e: EntryRun, pair: PairRun):
        futures = self.t.transfer_layer.map(unmapped(self.store), unmapped(pair.plan), unmapped(pair.analysis),
                                            unmapped(e.plan), e.plan.layers)

        def collect():
            layers, first_error = [], None
            for job, future in zip(e.plan.layers, futures):
                try:
                    part, result = outcome(future)
                except Exception as error:  # noqa: BLE001 - wait for every layer, report the first failure
                    first_error = first_error or LayerError(job.new_layer, error)
                    continue
                e.parts["transfer"].append(part)
                layers.append(result)
            if first_error:
                raise first_error
            e.stored["layers"] = layers
        return collect

    def _assemble(self, e: EntryRun, pair: PairRun):
        future = self.t.assemble.submit(self.store, pair.plan, pair.analysis, e.plan, e.stored.pop("layers"))
        return self._collect_into(e, "write", "migrated", future)

    def _train(self, e: EntryRun, pair: PairRun):
        collectors = []
        if e.plan.lft:
            future = self.t.light_finetune.submit(self.store, pair.plan, e.plan, e.stored["migrated"])
            collectors.append(self._collect_into(e, "lft", "lft", future))
        if e.plan.vanilla:
            future = self.t.vanilla_baseline.submit(self.store, pair.plan, e.plan)
            collectors.append(self._collect_into(e, "vanilla_baseline", "vanilla", future))
        return (lambda: [collect() for collect in collectors]) if collectors else None

    def _fidelity(self, e: EntryRun, pair: PairRun):
        if not e.plan.fidelity_key:
            return None
        future = self.t.fidelity.submit(self.store, pair.plan, e.plan, e.stored["migrated"], e.stored.get("lft"))
        return self._collect_into(e, "fidelity", "fidelity", future)

    def _gate(self, e: EntryRun, pair: PairRun):
        if not e.plan.gate_key:
            return None
        final = e.stored.get("lft") or e.stored["migrated"]
        future = self.t.quality_gate.submit(self.store, pair.plan, e.plan, final)
        return self._collect_into(e, "gate", "gate", future)

    def _evaluate(self, e: EntryRun, pair: PairRun):
        if not e.plan.evals:
            return None
        futures = {job.row: self.t.evaluate.submit(self.store, pair.plan, e.plan, job, e.stored.get(job.adapter or ""))
                   for job in e.plan.evals}

        def collect():
            for row, future in futures.items():
                part, result = outcome(future)
                e.parts["eval"].append(part)
                e.evals[row] = result.facts
            artifacts.evaluation_artifact(e.name, e.evals)
        return collect

    def _publish(self, e: EntryRun, pair: PairRun, overwrite: bool):
        source = e.stored.get("lft") or e.stored["migrated"]
        future = self.t.publish.submit(self.store, e.name, source, e.output, self.report_updates(e, pair),
                                       overwrite=overwrite, serving=e.options.serving,
                                       base_model=pair.plan.new_model)

        def collect():
            e.published, e.status = future.result(), "published"
        return collect

    def _collect_into(self, e: EntryRun, step: str, slot: str, future: PrefectFuture):
        def collect():
            part, e.stored[slot] = outcome(future)
            e.parts[step].append(part)
        return collect

    # ----------------------------------------------------------------- reporting

    def report_updates(self, e: EntryRun, pair: PairRun) -> dict[str, Any]:
        """What the published migration_report.json gets on top of the assembled report."""
        from prefect.runtime import flow_run

        return report_updates(pair.plan, e.plan, e.stored, e.evals, e.steps(pair.steps), self.store,
                              flow_run_id=str(flow_run.id))

    def summary(self, e: EntryRun, pair: PairRun | None) -> dict[str, Any]:
        if e.status != "published" or pair is None:
            return {}
        steps = e.steps(pair.steps)
        migrated = e.stored["migrated"].facts
        return {
            "output": redact_uri(e.published or e.output),
            "shared_vocabulary_size": pair.analysis.facts["shared_vocabulary_size"],
            "layer_mapping": pair.analysis.facts["layer_mapping"],
            "max_refactorisation_residual": migrated["max_refactorisation_residual"],
            "seconds": round(sum(s["seconds"] for s in steps.values()), 2),
            "steps": steps,
            "evaluation": {row: f["accuracy"] for row, f in e.evals.items()},
            **({"fidelity": e.stored["fidelity"].facts["fidelity"]} if "fidelity" in e.stored else {}),
            **({"quality_gate": e.stored["gate"].facts} if "gate" in e.stored else {}),
        }


class LayerError(Exception):
    """A per-layer transfer failed (after its retries): names the layer; :attr:`cause` is the original error."""

    def __init__(self, new_layer: int, cause: BaseException):
        detail = str(cause) if isinstance(cause, LorasuiteError) else describe_error(cause)
        super().__init__(f"new layer {new_layer}: {detail}")
        self.new_layer, self.cause = new_layer, cause
