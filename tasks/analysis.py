"""The pair's plan: identities of both models and of the calibration text, and every stage key.

The seven analysis stages themselves are generated from :data:`lorasuite_core.pipeline.graph.PAIR_GRAPH`
(:mod:`tasks.stages`).  The stage store is the only cache (see :mod:`tasks._support`).
"""
from __future__ import annotations

from prefect import get_run_logger, task

from lorasuite_core.pipeline import plans
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.pipeline.plans import PairPlan
from lorasuite_core.io.uris import redact_uri

from ._support import NO_RECORDS, forward_core_logs


@task(name="identify-pair", **NO_RECORDS)
def identify_pair(old_model: str, new_model: str, analysis: AnalysisOptions, head_transform: str = "lstsq") -> PairPlan:
    """Identities of both models and of the calibration text (listings, not tensors); every stage key
    (``head_transform``: the mode of the pair's unit maps)."""
    forward_core_logs()
    plan = plans.plan_pair(old_model, new_model, analysis, head_transform)
    get_run_logger().info("pair %s -> %s: analysis key %s", redact_uri(old_model), redact_uri(new_model),
                          plan.stage_keys["head_similarity"][:16])
    return plan
