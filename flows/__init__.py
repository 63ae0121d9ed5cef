"""Prefect flows of the lorasuite pipeline.

Design
------
Flows orchestrate; the work is in the tasks (``tasks/``), which wrap ``lorasuite_core``.

* ``migrate_adapter`` — one adapter; ``migrate_fleet`` — one model pair, many adapters (the
  pair analysis runs once and is reused by every adapter); ``on_base_model_release`` — a new
  base model plus a fleet manifest (``flows/migration.py``).
* The pair analysis runs once per model pair and calibration set *across runs too*: its
  stages are cached in the stage store (``lorasuite_core.pipeline.stage_store``) under keys built from
  model identities, the calibration hash and ``ALGORITHM_VERSION``.
* Adapters go through the entry graph (``lorasuite_core/pipeline/graph.py``) level by level, run by the
  one runner on Prefect tasks generated from the graph (``flows/pipeline.py``, ``tasks/stages.py``).
* Artifacts: CKA heatmap, layer-mapping table, head-mapping summary, evaluation tables, fleet
  progress and summary (``flows/artifacts.py``).
* ``run_migrate_adapter`` / ``run_migrate_fleet`` (``flows/entrypoints.py``) are the plain-Python
  entry points the CLI calls.
* The CLI (``flows/cli.py``) and the demo (``flows/demo.py``) live here because they run the
  flows; the names below load lazily so that ``lorasuite --help`` does not import Prefect.
"""
from importlib import import_module

_HOMES = {"migrate_adapter": "migration", "migrate_fleet": "migration", "on_base_model_release": "migration",
          "run_migrate_adapter": "entrypoints", "run_migrate_fleet": "entrypoints"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["migrate_adapter", "migrate_fleet", "on_base_model_release", "run_migrate_adapter", "run_migrate_fleet"]
