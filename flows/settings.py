"""Where a run keeps its stage entries, and how its tasks run.

* **Stage store root**: the flow parameter ``cache_root``, else ``$LORASUITE_CACHE_ROOT``, else
  ``~/.cache/lorasuite/pipeline`` (:func:`lorasuite_core.stage_store.default_store_root`).
  A local directory or any fsspec URI (``s3://bucket/prefix``).  It is the only cache: Prefect
  result persistence is off for every task and flow (see :mod:`tasks._support`), so nothing of
  Prefect's is stored there or read back.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorasuite_core.stage_store import default_store_root


def resolve_store_root(cache_root: str | None) -> str:
    """The stage store root of a run: ``cache_root`` or the default, local paths made absolute."""
    root = cache_root or default_store_root()
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return root


def task_runner():
    """Thread pool sized so concurrent tasks do not oversubscribe the CPU.

    Each task's torch ops already use every intra-op thread; on a CPU-only worker running
    more tasks at once than cores / threads makes them spin against each other (measured
    here: 10x slower). ``LORASUITE_MAX_PARALLEL_TASKS`` overrides (e.g. on GPU workers).
    """
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    default = max(1, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
    return ThreadPoolTaskRunner(max_workers=int(os.environ.get("LORASUITE_MAX_PARALLEL_TASKS", default)))
