"""Where a run keeps its stage entries and Prefect's result records.

* **Stage store root**: the flow parameter ``cache_root``, else ``$LORASUITE_CACHE_ROOT``, else
  ``~/.cache/lorasuite/pipeline`` (:func:`lorasuite_core.stage_store.default_store_root`).
  A local directory or any fsspec URI (``s3://bucket/prefix``).
* **Prefect result storage** (the small JSON records behind task caching):
  ``$LORASUITE_RESULT_STORAGE`` (the slug of a saved storage block, e.g. an ``s3-bucket``
  block of prefect-aws) if set; else ``<root>/prefect-results`` — a local path for a local
  root, or, for a remote root, a ``RemoteFileSystem`` block named after the root and saved on
  the Prefect API (it holds only the base path: credentials come from the worker's
  environment, never from the block).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasuite_core import storage
from lorasuite_core.stage_store import default_store_root

RESULT_STORAGE_ENV = "LORASUITE_RESULT_STORAGE"
RESULTS_DIR = "prefect-results"


@dataclass(frozen=True)
class RunStorage:
    store: str              # stage store root (path or URI)
    result_storage: Any     # Path or a saved WritableFileSystem block


def resolve_run_storage(cache_root: str | None) -> RunStorage:
    root = cache_root or default_store_root()
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    return RunStorage(store=root, result_storage=_result_storage(root))


def _result_storage(root: str) -> Any:
    from prefect.blocks.core import Block

    slug = os.environ.get(RESULT_STORAGE_ENV)
    if slug:
        return Block.load(slug)
    if not storage.is_remote(root):
        return Path(root) / RESULTS_DIR
    return _remote_result_block(storage.join_uri(root, RESULTS_DIR))


def _remote_result_block(basepath: str) -> Any:
    from prefect.filesystems import RemoteFileSystem

    name = "lorasuite-results-" + hashlib.sha256(basepath.encode()).hexdigest()[:12]
    try:
        block = RemoteFileSystem.load(name)
        if block.basepath == basepath:
            return block
    except ValueError:  # not saved yet
        pass
    RemoteFileSystem(basepath=basepath).save(name, overwrite=True)
    return RemoteFileSystem.load(name)


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
