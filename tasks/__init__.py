"""Prefect tasks of the lorasuite pipeline: one per stage of the graph, plus the plans, the check, publication.

Design
------
* A task does no numerics: it calls one stage function (``lorasuite_core.pipeline.pair_stages`` or
  ``lorasuite_core.pipeline.stages``), forwards the
  core's log lines to the run log and reports, through the run logger, whether the stage was
  computed or reused.  ``lorasuite_core`` never imports Prefect.
* Stage tasks exchange :class:`~lorasuite_core.pipeline.stage_store.StageResult` objects — a store URI
  and small JSON facts — never tensors; the arrays live in safetensors files of the stage
  store (local directory by default, object storage when the cache root is an ``s3://`` URI).
* Caching: the stage store is the only cache; the key is the stage key (model identities from
  file listings, calibration hash, ``ALGORITHM_VERSION``, options, upstream keys).  Prefect's
  task caching and result persistence are off (no result record is ever written or read:
  ``tasks._support.NO_RECORDS``); a reused stage logs "reused" and reports it in ``steps``.
* The stage tasks are generated from the graph table (:mod:`tasks.stages`): the per-layer
  transfer is submitted once per new layer; tasks that need an accelerator carry the
  ``lorasuite-gpu`` tag (for tag concurrency limits / GPU workers).
"""
# transformers resolves its names lazily, and two task threads resolving them at once can fail
# ("ImportError: cannot import name 'AutoTokenizer'", seen in 3 of 5 cold runs when the vocabulary
# and activations stages start together): resolve them once, here, before any task thread runs.
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401,E402

from .adapters import check_entry, entry_failed, plan_adapter, publish
from .analysis import identify_pair
from .stages import BATCH_TASKS, STAGE_TASKS

__all__ = ["BATCH_TASKS", "check_entry", "entry_failed", "identify_pair", "plan_adapter", "publish", "STAGE_TASKS"]
