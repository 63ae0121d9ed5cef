"""Per-adapter tasks around the entry graph: the pre-run check, planning, publication.

The stages between planning and publication (``transfer_layer`` mapped over the new layers,
assembly, LFT, baseline, fidelity, gate, evaluation rows) are generated from
:data:`lorasuite_core.pipeline.graph.ENTRY_GRAPH` (:mod:`tasks.stages`).
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.states import Failed, State

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline import plans, stages
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import check_entry as check
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.plans import AdapterPlan, PairPlan
from lorasuite_core.io.uris import redact_uri

from ._support import NO_RECORDS, forward_core_logs


@task(name="check-entry", **NO_RECORDS)
def check_entry(old_model: str, new_model: str, analysis: AnalysisOptions, adapter: str, output: str,
                options: MigrationOptions, cache_root: str, *, overwrite: bool,
                skip_finished: bool = False) -> bool | State:
    """:func:`lorasuite_core.pipeline.runner.check_entry`: output safety, then the adapter loads and fits.

    A user error (bad adapter, unsafe output) ends the task Failed with its one line as the message and the
    error as its data, so the runner fails the entry with it, and the run log holds no traceback."""
    forward_core_logs()
    try:
        return check(old_model, new_model, analysis, adapter, output, options, cache_root, overwrite=overwrite,
                     skip_finished=skip_finished)
    except LorasuiteError as error:
        return Failed(message=" ".join(str(error).split()), data=error)


@task(name="plan-adapter", **NO_RECORDS, task_run_name="plan-{name}")
def plan_adapter(plan: PairPlan, analysis: StageResult, name: str, adapter: str,
                 options: MigrationOptions) -> AdapterPlan:
    """Load the adapter, check it was trained on the old model, list its per-layer jobs and keys."""
    forward_core_logs()
    planned = plans.plan_adapter(plan, analysis, name, adapter, options)
    get_run_logger().info("adapter %s (%s): %d modules, %d new layers to transfer", name, redact_uri(adapter),
                          planned.modules, len(planned.layers))
    return planned


@task(name="publish", **NO_RECORDS, task_run_name="publish-{name}")
def publish(store: str, name: str, source: StageResult, output: str, report_updates: dict[str, Any],
            overwrite: bool = False, serving: str | None = None, base_model: str | None = None) -> str:
    """Copy the finished adapter to ``output``: data under a temporary prefix, completion manifest last."""
    forward_core_logs()
    published = stages.publish(StageStore.at(store), source.uri, output, report_updates, overwrite=overwrite,
                               serving=serving, base_model=base_model)
    get_run_logger().info("published %s to %s", name, redact_uri(published))
    return published


@task(name="adapter-failed", **NO_RECORDS, task_run_name="{name}")
def entry_failed(name: str, error: str) -> State:
    """A fleet entry that failed, as a Failed task run named after it in the run graph (an entry can fail
    before any of its tasks ran: a missing adapter, an unsafe output); the message is the reason."""
    return Failed(message=f"adapter {name} failed at {error}")
