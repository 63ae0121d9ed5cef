"""Prefect tasks of the lorasuite pipeline: thin wrappers over :mod:`lorasuite_core.pipeline.stages`.

Design
------
* A task does no numerics: it calls one ``lorasuite_core.pipeline.stages`` function, forwards the
  core's log lines to the run log and reports, through the run logger, whether the stage was
  computed or reused.  ``lorasuite_core`` never imports Prefect.
* Stage tasks exchange :class:`~lorasuite_core.pipeline.stage_store.StageResult` objects — a store URI
  and small JSON facts — never tensors; the arrays live in safetensors files of the stage
  store (local directory by default, object storage when the cache root is an ``s3://`` URI).
* Caching: the stage store is the only cache; the key is the stage key (model identities from
  file listings, calibration hash, ``ALGORITHM_VERSION``, options, upstream keys).  Prefect's
  task caching and result persistence are off (no result record is ever written or read:
  ``tasks._support.NO_RECORDS``); a reused stage logs "reused" and reports it in ``steps``.
* ``transfer_layer`` is the per-layer unit, mapped with ``.map``; tasks that need an
  accelerator carry the ``lorasuite-gpu`` tag (for tag concurrency limits / GPU workers).
"""
# transformers resolves its names lazily, and two task threads resolving them at once can fail
# ("ImportError: cannot import name 'AutoTokenizer'", seen in 3 of 5 cold runs when the vocabulary
# and activations stages start together): resolve them once, here, before any task thread runs.
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401,E402

from .adapters import assemble, check_output, entry_failed, plan_adapter, publish, transfer_layer
from .analysis import (PAIR_TASKS, activations, cka, head_similarity, identify_pair, layer_mapping, transfer_matrix,
                       vocabulary)
from .training import evaluate, fidelity, light_finetune, quality_gate, vanilla_baseline

ANALYSIS_TASKS = tuple(PAIR_TASKS.values())
STORE_TASKS = ANALYSIS_TASKS + (transfer_layer, assemble, light_finetune, vanilla_baseline, fidelity, quality_gate, evaluate)

__all__ = [
    "activations", "assemble", "check_output", "cka", "entry_failed", "evaluate", "fidelity", "head_similarity",
    "identify_pair",
    "layer_mapping", "light_finetune", "plan_adapter", "publish", "quality_gate", "transfer_layer", "transfer_matrix",
    "vanilla_baseline", "vocabulary", "ANALYSIS_TASKS", "PAIR_TASKS", "STORE_TASKS",
]
