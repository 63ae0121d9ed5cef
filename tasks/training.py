"""Optional per-adapter tasks: light fine-tuning, a vanilla LoRA baseline, fidelity, the quality gate, evaluation rows.

Thin wrappers over :func:`lorasuite_core.pipeline.stages.light_finetune`, ``vanilla_baseline`` and
``evaluate`` (which call :mod:`lorasuite_core.training.train` / :mod:`lorasuite_core.training.evaluation`).
All load a whole torch model, so they run one at a time per worker process and carry the
``lorasuite-gpu`` tag; each is cached in the stage store by its inputs' identities.
"""
from __future__ import annotations

from prefect import task

from lorasuite_core.pipeline import stages
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.stages import AdapterPlan, EvalJob, PairPlan

from ._support import run_stage, stage_task_options


@task(**stage_task_options("lft", heavy=True),
      task_run_name="lft-{adapter.name}")
def light_finetune(store: str, plan: PairPlan, adapter: AdapterPlan, migrated: StageResult) -> StageResult:
    """LFT of the migrated adapter on the new model with the entry's data."""
    return run_stage(stages.light_finetune, StageStore.at(store), plan, adapter, migrated.uri, torch_model=True)


@task(**stage_task_options("vanilla", heavy=True),
      task_run_name="vanilla-baseline-{adapter.name}")
def vanilla_baseline(store: str, plan: PairPlan, adapter: AdapterPlan) -> StageResult:
    """A fresh LoRA on the new model with the same data and budget, for the evaluation table."""
    return run_stage(stages.vanilla_baseline, StageStore.at(store), plan, adapter, torch_model=True)


@task(**stage_task_options("eval", heavy=True),
      task_run_name="eval-{adapter.name}-{job.label}")
def evaluate(store: str, plan: PairPlan, adapter: AdapterPlan, job: EvalJob,
             adapter_entry: StageResult | None = None) -> StageResult:
    """Accuracy of one row of the evaluation table (a model with or without one adapter)."""
    uri = adapter_entry.uri if adapter_entry is not None else None
    return run_stage(stages.evaluate, StageStore.at(store), plan, adapter, job, uri, torch_model=True)


@task(**stage_task_options("gate", heavy=True),
      task_run_name="quality-gate-{adapter.name}")
def quality_gate(store: str, plan: PairPlan, adapter: AdapterPlan, final: StageResult) -> StageResult:
    """The quality gate: teacher agreement on held-out prompts against the bare new model's (fails the entry)."""
    return run_stage(stages.quality_gate, StageStore.at(store), plan, adapter, final.uri, torch_model=True)


@task(**stage_task_options("fidelity", heavy=True),
      task_run_name="fidelity-{adapter.name}")
def fidelity(store: str, plan: PairPlan, adapter: AdapterPlan, migrated: StageResult,
             lft: StageResult | None = None) -> StageResult:
    """Fidelity of the migrated adapter (and of its LFT): the share of the teacher gap it closes."""
    return run_stage(stages.fidelity, StageStore.at(store), plan, adapter, migrated.uri,
                     lft.uri if lft is not None else None, torch_model=True)
