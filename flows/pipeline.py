"""The flows' side of the one runner: a Prefect executor, the flow results, the analysis artifacts.

Design
------
* :class:`lorasuite_core.pipeline.runner.Runner` walks the stage graphs
  (:mod:`lorasuite_core.pipeline.graph`, where the stage order lives); :class:`PrefectExecutor`
  gives it the tasks generated from the same table (:mod:`tasks.stages`): a call is a
  ``submit``, its result the future's.  The pair graph is submitted whole (a task waits on the
  futures it reads, so the vocabulary/transfer-matrix branch runs beside the activations/CKA/
  mapping branch); each wave of the entry graph is submitted for every live entry before the
  runner waits on any, so entries (and the layers of each) run side by side on the task runner; a batched
  stage (``teacher``, ``eval``) is one task for the level's entries (:data:`tasks.stages.BATCH_TASKS`).
  A failure fails only its entry, with the stage and the error's message.
* :class:`PipelineRun` is one flow run: its stage store root (:mod:`flows.settings`), the runner,
  the analysis and evaluation artifacts, the summaries the flows return.
* Report ``steps``: per stage ``{"cache": "computed" | "reused", "seconds"}``, summed once by
  the runner (:func:`lorasuite_core.pipeline.graph.step`).
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel

import tasks
from lorasuite_core.pipeline.graph import PAIR_STAGES, Stage
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import EntryRun, PairRun, Runner
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.pipeline.pair_stages import cka_of_updates
from lorasuite_core.pipeline.plans import AdapterPlan, PairPlan
from lorasuite_core.pipeline.stages import route_summary
from lorasuite_core.io.uris import redact_uri

from . import artifacts
from .settings import resolve_cache_root

__all__ = ["EntryResult", "EntryRun", "FleetResult", "PipelineRun", "PrefectExecutor"]


class PrefectExecutor:
    """The runner's calls as Prefect task submissions (see :class:`lorasuite_core.pipeline.runner.Executor`)."""

    def check(self, *args: Any, **kwargs: Any) -> PrefectFuture:
        return tasks.check_entry.submit(*args, **kwargs)

    def plan_pair(self, old_model: str, new_model: str, analysis: AnalysisOptions,
                  head_transform: str = "lstsq") -> PairPlan:
        return tasks.identify_pair(old_model, new_model, analysis, head_transform)

    def stage(self, name: str, stage: Stage, store: str, plan: PairPlan, adapter: AdapterPlan | None = None,
              job: Any = None, inputs: tuple = ()) -> PrefectFuture:
        task = tasks.STAGE_TASKS[name]
        if adapter is None:
            return task.submit(store, plan, inputs)
        return task.submit(store, plan, adapter, job, inputs)

    def batch(self, name: str, stage: Stage, store: str, plan: PairPlan, items: list) -> PrefectFuture:
        return tasks.BATCH_TASKS[name].submit(store, plan, items)

    def plan_adapter(self, plan: PairPlan, analysis: Any, name: str, adapter: str,
                     options: MigrationOptions) -> PrefectFuture:
        return tasks.plan_adapter.submit(plan, analysis, name, adapter, options)

    def publish(self, store: str, name: str, final: Any, output: str, updates: dict[str, Any],
                overwrite: bool, serving: str | None, base_model: str) -> PrefectFuture:
        return tasks.publish.submit(store, name, final, output, updates, overwrite=overwrite, serving=serving,
                                    base_model=base_model)

    def result(self, future: PrefectFuture) -> Any:
        return future.result()

    def report_facts(self) -> dict[str, Any]:
        from prefect.runtime import flow_run

        return {"flow_run_id": str(flow_run.id)}


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- the run


class PipelineRun:
    """One flow run: its stage store and the runner on Prefect tasks; see the module docstring."""

    def __init__(self, cache_root: str | None):
        self.store = resolve_cache_root(cache_root)
        self.runner = Runner(PrefectExecutor(), self.store)
        self.log = get_run_logger()
        self.log.info("stage store: %s", redact_uri(self.store))

    def run(self, old_model: str, new_model: str, analysis: AnalysisOptions, entries: list[EntryRun], *,
            overwrite: bool, skip_finished: bool = False, progress: Any = None) -> PairRun | None:
        """Check, analyse, migrate, publish (:meth:`Runner.run`); artifacts and log lines on the way."""
        pair = self.runner.run(old_model, new_model, analysis, entries, overwrite=overwrite,
                               skip_finished=skip_finished, progress=progress, on_pair=self.analysis_artifacts)
        for e in entries:
            if e.plan and e.evals:
                artifacts.evaluation_artifact(e.name, e.evals)
            if e.status == "failed":
                self.log.error("adapter %s failed at %s", e.name, e.error)
        return pair

    def analysis_artifacts(self, pair: PairRun) -> None:
        steps = pair.steps()
        reused = [stage for stage in PAIR_STAGES if steps[stage]["cache"] == "reused"]
        self.log.info("pair analysis: %d/%d stages reused (%s)", len(reused), len(PAIR_STAGES),
                      ", ".join(reused) or "none")
        plan = pair.plan
        cka = cka_of_updates(StageStore.at(self.store), pair.out["cka"].uri)
        artifacts.analysis_artifacts(plan.old_model, plan.new_model, cka, pair.out["layer_mapping"], pair.analysis,
                                     new_heads=plan.new().dims.num_heads,   # config only (weights are lazy)
                                     new_layers=plan.new().dims.num_layers)

    def summary(self, e: EntryRun, pair: PairRun | None) -> dict[str, Any]:
        if e.status != "published" or pair is None:
            return {}
        steps = e.steps(pair)
        return {
            "output": redact_uri(e.published or e.output),
            "shared_vocabulary_size": pair.analysis.facts["shared_vocabulary_size"],
            "layer_mapping": pair.analysis.facts["layer_mapping"],
            "max_refactorisation_residual": e.out["migrated"].facts["max_refactorisation_residual"]
            if "migrated" in e.out else None,
            "seconds": round(sum(s["seconds"] for s in steps.values()), 2),
            "steps": steps,
            "evaluation": {row: f["accuracy"] for row, f in e.evals.items()},
            "route": route_summary(e.plan, e.out),
            **({"fidelity": e.out["fidelity"].facts["fidelity"]} if "fidelity" in e.out else {}),
            **({"quality_gate": e.out["gate"].facts} if "gate" in e.out else {}),
            **({"quality_gate": e.out["route"].facts["gate"]} if "route" in e.out else {}),
        }

    @staticmethod
    def result(e: EntryRun, summary: dict[str, Any] | None = None) -> EntryResult:
        return EntryResult(name=e.name, adapter=redact_uri(e.adapter), output=redact_uri(e.output),
                           status=e.status, error=e.error, note=e.note, summary=summary or {})
