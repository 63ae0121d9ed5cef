"""Pair-analysis tasks: thin wrappers over :mod:`lorasuite_core.pipeline.stages`, one per stage.

Each takes the cache root (``store``: local path or URI), the :class:`~lorasuite_core.pipeline.stages.PairPlan`
from :func:`identify_pair` and the :class:`~lorasuite_core.pipeline.stage_store.StageResult` of the
stages it reads, and returns its own StageResult (a URI and small facts; the arrays stay in
the store).  The stage store is the only cache (see :mod:`tasks._support`).
"""
from __future__ import annotations

from prefect import get_run_logger, task

from lorasuite_core.pipeline import stages
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.pipeline.stages import PairPlan
from lorasuite_core.io.uris import redact_uri

from ._support import NO_RECORDS, forward_core_logs, run_stage, stage_task_options


@task(name="identify-pair", **NO_RECORDS)
def identify_pair(old_model: str, new_model: str, analysis: AnalysisOptions) -> PairPlan:
    """Identities of both models and of the calibration text (listings, not tensors); every stage key."""
    forward_core_logs()
    plan = stages.plan_pair(old_model, new_model, analysis)
    get_run_logger().info("pair %s -> %s: analysis key %s", redact_uri(old_model), redact_uri(new_model),
                          plan.stage_keys["head_similarity"][:16])
    return plan


@task(**stage_task_options("vocabulary"))
def vocabulary(store: str, plan: PairPlan) -> StageResult:
    """Shared tokens of the two tokenizers."""
    return run_stage(stages.vocabulary, StageStore.at(store), plan)


@task(**stage_task_options("transfer_matrix"))
def transfer_matrix(store: str, plan: PairPlan, vocabulary: StageResult) -> StageResult:
    """Residual-stream transfer matrices P, Q from the shared embeddings."""
    return run_stage(stages.transfer_matrix, StageStore.at(store), plan, vocabulary.uri)


@task(**stage_task_options("activations", heavy=True))
def activations(store: str, plan: PairPlan) -> StageResult:
    """Paired hidden states of both models on the calibration text."""
    return run_stage(stages.activations, StageStore.at(store), plan, torch_model=True)


@task(**stage_task_options("cka"))
def cka(store: str, plan: PairPlan, activations: StageResult) -> StageResult:
    """CKA of every old/new layer pair (layer updates and hidden states)."""
    return run_stage(stages.cka, StageStore.at(store), plan, activations.uri)


@task(**stage_task_options("layer_mapping"))
def layer_mapping(store: str, plan: PairPlan, cka: StageResult) -> StageResult:
    """Monotone old -> new layer mapping on the update CKA."""
    return run_stage(stages.layer_mapping, StageStore.at(store), plan, cka.uri)


@task(**stage_task_options("head_similarity"))
def head_similarity(store: str, plan: PairPlan, vocabulary: StageResult, transfer_matrix: StageResult,
                    activations: StageResult, cka: StageResult, layer_mapping: StageResult) -> StageResult:
    """Head and neuron matching of every mapped layer pair; stores the whole pair analysis."""
    return run_stage(stages.head_similarity, StageStore.at(store), plan, vocabulary.uri, transfer_matrix.uri,
                     activations.uri, cka.uri, layer_mapping.uri)


#: One task per stage of :data:`lorasuite_core.pipeline.stages.PAIR_GRAPH` (a test checks they agree).
PAIR_TASKS = {"vocabulary": vocabulary, "activations": activations, "transfer_matrix": transfer_matrix,
              "cka": cka, "layer_mapping": layer_mapping, "head_similarity": head_similarity}
