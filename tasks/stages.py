"""One Prefect task per stage of :mod:`lorasuite_core.pipeline.graph`, generated from the table.

A stage's task has the stage's task name, its ``run_name`` pattern (``transfer-{adapter.name}-layer-
{job.new_layer}``), the one retry layer and no Prefect records (:func:`tasks._support.stage_task_options`),
the ``lorasuite-gpu`` tag where the table says ``gpu`` and :data:`tasks._support.TORCH_MODEL_LOCK`
where it says ``torch_model``.  Its body is :func:`lorasuite_core.pipeline.runner.call`, the same call
the in-process executor makes.  Arguments: the store root, the pair plan, for an entry stage the
adapter plan and the job (``None`` unless the stage fans out), and ``inputs``: the upstream stage
results (or futures: Prefect waits on them), handed to the stage as URIs.  A batched stage (``batch`` in the
table: the teacher, evaluation) also has a task for several entries at once (:data:`BATCH_TASKS`, named ``<task>-batch``):
its body is :func:`lorasuite_core.pipeline.runner.call_batch`, the same retries and lock, and it returns one
result (or that entry's error) per adapter.
"""
from __future__ import annotations

from typing import Any

from prefect import Task, task

from lorasuite_core.pipeline.graph import ENTRY_GRAPH, PAIR_GRAPH, Stage
from lorasuite_core.pipeline.runner import call, call_batch
from lorasuite_core.pipeline.stage_store import StageResult
from lorasuite_core.pipeline.plans import AdapterPlan, PairPlan

from ._support import run_batch, run_stage, stage_task_options


def _options(stage: Stage) -> dict[str, Any]:
    return {**stage_task_options(stage.task, heavy=stage.gpu),
            **({"task_run_name": stage.run_name} if stage.run_name else {})}


def _pair_task(name: str, stage: Stage) -> Task:
    def run(store: str, plan: PairPlan, inputs: tuple = ()) -> StageResult:
        return run_stage(call, stage, store, plan, None, None, inputs, torch_model=stage.torch_model)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = stage.fn.__doc__
    return task(**_options(stage))(run)


def _entry_task(name: str, stage: Stage) -> Task:
    def run(store: str, plan: PairPlan, adapter: AdapterPlan, job: Any = None, inputs: tuple = ()) -> StageResult:
        return run_stage(call, stage, store, plan, adapter, job, inputs, torch_model=stage.torch_model)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = stage.fn.__doc__
    return task(**_options(stage))(run)


#: Stage name -> its task, for both graphs.
STAGE_TASKS: dict[str, Task] = {**{name: _pair_task(name, stage) for name, stage in PAIR_GRAPH.items()},
                                **{name: _entry_task(name, stage) for name, stage in ENTRY_GRAPH.items()}}


def _batch_task(name: str, stage: Stage) -> Task:
    def run(store: str, plan: PairPlan, items: list) -> list:
        return run_batch(call_batch, stage, store, plan, items, torch_model=stage.torch_model)

    run.__name__ = run.__qualname__ = f"{name}_batch"
    run.__doc__ = stage.batch.__doc__
    return task(**stage_task_options(f"{stage.task}-batch", heavy=stage.gpu))(run)


#: Batched stage name -> its task for several entries.
BATCH_TASKS: dict[str, Task] = {name: _batch_task(name, stage) for name, stage in ENTRY_GRAPH.items() if stage.batch}
