"""What every lorasuite task shares: no Prefect result records, retries, logging.

* **One cache layer.** The :class:`~lorasuite_core.pipeline.stage_store.StageStore` is the only cache:
  a stage task always runs, and the stage finds its complete, sha256-verified entry (reused) or
  computes it.  Prefect's own task caching and result persistence are *off* for every task
  (``cache_policy=NO_CACHE, persist_result=False``) and every flow: Prefect reads a result
  record with whatever serializer the record names (pickle included), so a record planted in a
  shared cache would run code on the next run.  Nothing of Prefect's is ever read back from
  storage.
* Retries: heavy tasks retry twice with exponential backoff (1 s, 2 s), except on a
  :class:`~lorasuite_core.errors.LorasuiteError` — bad input does not get better by retrying,
  and storage errors have already been retried with backoff by ``lorasuite_core.io.retry``.
* Logging: :func:`forward_core_logs` hands ``lorasuite_core`` records to Prefect's API log
  handlers while inside a run (what ``PREFECT_LOGGING_EXTRA_LOGGERS`` does, minus the warnings
  outside runs), so the numerics' own lines land in the run's log — among them the one line per stage
  (time, computed or reused) that :class:`~lorasuite_core.pipeline.stage_store.StageStore` writes for
  the terminal as well, the same line as in process; :func:`log_stage` adds, at DEBUG, where the
  entry is.  URIs are logged redacted.
* States: a stage task whose entry was reused ends ``Cached`` (type Completed, :func:`as_state`),
  one that computed it ``Completed``: the run graph shows which stages this run did.
* :data:`TORCH_MODEL_LOCK` serialises, within one worker process, the tasks that load a whole
  torch model (activations, LFT, baseline training, evaluation): transformers sets
  process-global torch defaults while loading, and one device runs one such job at a time.
  Spread them over processes/machines with a distributed task runner instead.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.stage_store import StageResult
from lorasuite_core.io.uris import redact_uri

GPU_TAG = "lorasuite-gpu"
CORE_LOGGER = "lorasuite_core"
TORCH_MODEL_LOCK = threading.Lock()
_forward_lock = threading.Lock()


def not_a_user_error(task, task_run, state) -> bool:
    """retry_condition_fn: retry anything but a LorasuiteError."""
    return not isinstance(state.data, LorasuiteError)


NO_RECORDS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)
"""``@task``/``@flow`` keywords: no Prefect cache lookups, no result records written or read."""


def stage_task_options(stage: str, *, heavy: bool = False, retries: int = 2) -> dict[str, Any]:
    """Keyword arguments of ``@task`` for a store-backed stage."""
    return dict(
        name=stage.replace("_", "-"),
        **NO_RECORDS,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_condition_fn=not_a_user_error,
        tags=[GPU_TAG] if heavy else [],
    )


class _RunLogForwarder(logging.Handler):
    """Hands a record to Prefect's API log handlers, but only inside a flow or task run."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return
        for handler in logging.getLogger("prefect.extra").handlers:
            handler.handle(record)


_FORWARDER = _RunLogForwarder(logging.INFO)   # the core loggers are at DEBUG for the log file; the run log: INFO


def forward_core_logs() -> None:
    """Send ``lorasuite_core`` records to the current run's log; idempotent.

    Records below INFO are not forwarded; above that the ``lorasuite_core`` logger's effective level
    decides (DEBUG under ``lorasuite migrate``, WARNING under Prefect's default logging config, whose
    root logger is at WARNING; a worker that wants the INFO lines sets a ``lorasuite_core`` level
    in its logging config, ``PREFECT_LOGGING_SETTINGS_PATH``).
    """
    core = logging.getLogger(CORE_LOGGER)
    with _forward_lock:
        if _FORWARDER not in core.handlers:
            core.addHandler(_FORWARDER)


def log_stage(result: StageResult) -> StageResult:
    """A DEBUG line in the run log: where the entry is (its time and cache status: the store's own line)."""
    verb = "reused" if result.reused else "computed"
    get_run_logger().debug("%s %s: %s (%.2fs)", verb, result.stage, redact_uri(result.uri), result.seconds)
    return result


def as_state(result: StageResult) -> StageResult | State:
    """A reused stage ends its task run in the state ``Cached`` (type Completed, as Prefect's own cache
    hits show), so the UI tells reused stages from computed ones; the result is the same StageResult."""
    if not result.reused:
        return result
    return Completed(name="Cached", message=f"reused {result.stage} entry {redact_uri(result.uri)}", data=result)


def run_stage(fn: Callable[..., StageResult], *args: Any, torch_model: bool = False) -> StageResult | State:
    """Call a lorasuite_core stage with core logs forwarded (and the torch-model lock if asked)."""
    forward_core_logs()
    if torch_model:
        with TORCH_MODEL_LOCK:
            return as_state(log_stage(fn(*args)))
    return as_state(log_stage(fn(*args)))


def run_batch(fn: Callable[..., list], *args: Any, torch_model: bool = False) -> list:
    """A batched stage's call (one result or error per entry) with core logs forwarded (and the lock if asked);
    each entry's result logged as :func:`log_stage` logs one."""
    forward_core_logs()
    if torch_model:
        with TORCH_MODEL_LOCK:
            results = fn(*args)
    else:
        results = fn(*args)
    return [log_stage(r) if isinstance(r, StageResult) else r for r in results]
