"""Per-adapter tasks: output check, planning, the per-layer transfer (the fan-out unit), assembly, publication.

``transfer_layer`` is mapped over an adapter's new layers (``transfer_layer.map``): each call
carries the old layers mapped onto one new layer, sums them and re-factorises by SVD, and
stores a :class:`~lorasuite_core.transfer.adapter.NewLayerResult`.  It is the unit that goes to GPU
workers (tag ``lorasuite-gpu``), retried on failure, and cached by (pair analysis, adapter
identity, layer, sources, head transform): a rerun after a failure redoes only missing layers.
"""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.states import Failed, State

from lorasuite_core.pipeline import stages
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.pipeline.stages import AdapterPlan, LayerJob, PairPlan
from lorasuite_core.io.uris import redact_uri

from ._support import NO_RECORDS, forward_core_logs, run_stage, stage_task_options


@task(name="check-output", **NO_RECORDS)
def check_output(output: str, inputs: dict[str, str | None]) -> str:
    """``empty``, ``complete`` (our finished publication), ``partial`` (ours, interrupted) or ``foreign``.

    Raises UnsafeOutputError for an output that would overwrite an input or the working directory.
    """
    return stages.output_status(output, inputs)


@task(name="plan-adapter", **NO_RECORDS, task_run_name="plan-{name}")
def plan_adapter(plan: PairPlan, analysis: StageResult, name: str, adapter: str,
                 options: MigrationOptions) -> AdapterPlan:
    """Load the adapter, check it was trained on the old model, list its per-layer jobs and keys."""
    forward_core_logs()
    planned = stages.plan_adapter(plan, analysis, name, adapter, options)
    get_run_logger().info("adapter %s (%s): %d modules, %d new layers to transfer", name, redact_uri(adapter),
                          planned.modules, len(planned.layers))
    return planned


@task(**stage_task_options("layer", heavy=True),
      task_run_name="transfer-{adapter.name}-layer-{job.new_layer}")
def transfer_layer(store: str, plan: PairPlan, analysis: StageResult, adapter: AdapterPlan,
                   job: LayerJob) -> StageResult:
    """Matching applied, deltas carried and summed, SVD re-factorisation — for one new layer."""
    return run_stage(stages.transfer_layer, StageStore.at(store), plan, analysis.uri, adapter, job)


@task(**stage_task_options("migrated"),
      task_run_name="assemble-{adapter.name}")
def assemble(store: str, plan: PairPlan, analysis: StageResult, adapter: AdapterPlan,
             layers: list[StageResult]) -> StageResult:
    """PEFT adapter directory and migration report from the per-layer results."""
    return run_stage(stages.assemble, StageStore.at(store), plan, analysis.uri, adapter, [r.uri for r in layers])


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
