"""Where a run keeps its stage entries, and how its tasks run.

* **Cache root** (where the stage store keeps its entries): the flow parameter ``cache_root``, else
  ``$LORASUITE_CACHE_ROOT``, else ``~/.cache/lorasuite/pipeline``
  (:func:`lorasuite_core.pipeline.stage_store.configured_cache_root`).
  A local directory or any fsspec URI (``s3://bucket/prefix``).  It is the only cache: Prefect
  result persistence is off for every task and flow (see :mod:`tasks._support`), so nothing of
  Prefect's is stored there or read back.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorasuite_core.pipeline.stage_store import configured_cache_root


def resolve_cache_root(cache_root: str | None) -> str:
    """The cache root of a run: ``cache_root`` or the configured one, local paths made absolute."""
    root = cache_root or configured_cache_root()
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return root


def task_runner():
    """The flows' task runner: a thread pool by default, prefect-ray's RayTaskRunner on request.

    * ``LORASUITE_TASK_RUNNER=ray`` (a local Ray cluster started for the run) or
      ``ray:ADDRESS`` (``ray:auto``, ``ray:ray://head:10001``) returns a ``RayTaskRunner``
      (the ``[ray]`` extra); ``threads`` or unset: the thread pool.  Anything else is a
      one-line error.  Read when :mod:`flows.migration` is imported, so a worker takes it from
      its environment or from the deployment's job variables (``env``).
    * Thread pool size: Prefect's own setting ``PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS``
      (environment or profile) wins when set; else ``LORASUITE_MAX_PARALLEL_TASKS``; else
      cores / torch intra-op threads.  Each task's torch ops already use every intra-op thread;
      on a CPU-only worker running more tasks at once than cores / threads makes them spin
      against each other (measured here: 10x slower).
    """
    from prefect.settings import get_current_settings

    from lorasuite_core.errors import LorasuiteError
    from lorasuite_core.settings import settings

    configured = settings()
    choice = configured.task_runner.strip()
    kind, _, address = choice.partition(":")
    if kind.lower() == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise LorasuiteError("LORASUITE_TASK_RUNNER=ray needs prefect-ray: pip install 'lorasuite[ray]'") from None
        return RayTaskRunner(address=address.strip() or None)
    if kind.lower() not in ("", "threads"):
        raise LorasuiteError(f"LORASUITE_TASK_RUNNER must be 'threads', 'ray' or 'ray:ADDRESS', not {choice!r}")

    from prefect.task_runners import ThreadPoolTaskRunner

    if get_current_settings().tasks.runner.thread_pool_max_workers is not None:
        return ThreadPoolTaskRunner()          # Prefect reads its own setting
    import torch

    default = max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
    return ThreadPoolTaskRunner(max_workers=configured.max_parallel_tasks or default)
