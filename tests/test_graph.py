"""The stage graphs, their functions and the generated Prefect tasks agree (no models: milliseconds)."""
from __future__ import annotations

import inspect
import string
from typing import get_args

import pytest

from lorasuite_core.pipeline import graph, pair_stages, route_stages, stages, teacher_stage
from lorasuite_core.pipeline.graph import ENTRY_GRAPH, FINAL, PAIR_GRAPH, levels, resolve_input, upstream
from lorasuite_core.pipeline.stage_store import StageResult
from lorasuite_core.pipeline.plans import EvalJob

BOTH = {**PAIR_GRAPH, **ENTRY_GRAPH}


def test_graphs_are_disjoint_and_declared_in_topological_order():
    assert not set(PAIR_GRAPH) & set(ENTRY_GRAPH)
    for table, readable in ((PAIR_GRAPH, set()), (ENTRY_GRAPH, set(PAIR_GRAPH))):
        seen = set(readable)
        for name, stage in table.items():
            missing = [u for u in upstream(stage) if u not in seen]
            assert not missing, f"{name} reads or follows {missing}, not declared before it"
            seen.add(name)
    for table in (PAIR_GRAPH, ENTRY_GRAPH):
        flat = [name for level in levels(table) for name in level]
        assert sorted(flat) == sorted(table)
        position = {name: i for i, level in enumerate(levels(table)) for name in level}
        for name, stage in table.items():
            assert all(position[u] < position[name] for u in upstream(stage) if u in table), name


def test_every_eval_row_reads_an_existing_stage_or_the_source_adapter():
    literal, none = get_args(EvalJob.model_fields["adapter"].annotation)     # Literal[...] | None
    for kind in (*get_args(literal), None):
        job = EvalJob(row="r", model="new", adapter=kind, key="k")
        read = ENTRY_GRAPH["eval"].job_input(job)
        assert read is None if kind in ("source", None) else read in ENTRY_GRAPH, kind


@pytest.mark.parametrize("name", list(BOTH))
def test_every_stage_function_takes_the_graphs_arguments(name):
    stage = BOTH[name]
    homes = (pair_stages,) if name in PAIR_GRAPH else (stages, route_stages, teacher_stage)   # pair / per-adapter
    assert any(getattr(home, stage.fn.__name__, None) is stage.fn for home in homes), \
        f"a stage function lives in {' or '.join(home.__name__ for home in homes)}"
    params = list(inspect.signature(stage.fn).parameters)
    assert params[:2] == ["store", "plan"]
    context = [] if name in PAIR_GRAPH else ["adapter"] + (["job"] if stage.fan_out else [])
    assert params[2:2 + len(context)] == context
    inputs = len(stage.inputs) + (1 if stage.job_input else 0)
    assert len(params) == 2 + len(context) + inputs, f"{name}: {params} for inputs {stage.inputs}"
    assert stage.step and stage.task


@pytest.mark.parametrize("name", list(BOTH))
def test_every_stage_has_its_task(name):
    import tasks
    from tasks._support import GPU_TAG

    stage, task = BOTH[name], tasks.STAGE_TASKS[name]
    assert set(tasks.STAGE_TASKS) == set(BOTH)
    assert task.name == stage.task.replace("_", "-")
    assert task.retries == 2 and task.persist_result is False
    assert (GPU_TAG in task.tags) == stage.gpu
    assert task.task_run_name == stage.run_name
    params = set(inspect.signature(task.fn).parameters)
    fields = {f.split(".")[0] for _, f, _, _ in string.Formatter().parse(stage.run_name or "") if f}
    assert fields <= params, f"{name}: run name {stage.run_name} names {fields - params}"
    assert len({t.task_key for t in tasks.STAGE_TASKS.values()}) == len(BOTH)


def test_batched_stages_read_no_entry_stage_and_have_their_task():
    import tasks

    batched = {name: stage for name, stage in ENTRY_GRAPH.items() if stage.batch}
    assert set(batched) == {"teacher", "eval"} and set(tasks.BATCH_TASKS) == set(batched)
    for name, stage in batched.items():
        assert stage.inputs == () and stage.batch_max >= 1
        assert (stage.fan_out is None) == (stage.batch_key is None)       # a fanned-out stage groups its jobs
        assert len(inspect.signature(stage.batch).parameters) == 3
        task = tasks.BATCH_TASKS[name]
        assert task.name == f"{stage.task}-batch" and task.retries == 2 and task.persist_result is False


def test_final_is_the_lft_where_it_ran_else_the_migrated_adapter():
    migrated, lft, route, copy, fresh = (StageResult(stage=s, key=s, uri=f"/{s}", reused=False, seconds=1.0)
                                         for s in ("migrated", "lft", "route", "copy", "fresh_lft"))
    assert resolve_input(FINAL, {"migrated": migrated}) is migrated
    assert resolve_input(FINAL, {"migrated": migrated, "lft": lft}) is lft
    assert resolve_input(FINAL, {"copy": copy}) is copy and resolve_input(FINAL, {"fresh_lft": fresh}) is fresh
    assert resolve_input(FINAL, {"copy": copy, "migrated": migrated, "lft": lft, "fresh_lft": fresh, "route": route}) \
        is route                                              # route auto: its choice
    assert resolve_input("lft", {"migrated": migrated}) is None
    source_row = EvalJob(row="old model + source adapter", model="old", adapter="source", key="k")
    assert resolve_input(ENTRY_GRAPH["eval"].job_input(source_row), {"migrated": migrated}) is None
    assert graph.step([migrated, lft.model_copy(update={"reused": True, "seconds": 0.5})]) == \
        {"cache": "computed", "seconds": 1.5}
    assert graph.step(lft.model_copy(update={"reused": True})) == {"cache": "reused", "seconds": 1.0}
