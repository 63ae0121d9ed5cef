"""What every lorasuite task shares: the store-backed cache policy, retries, logging.

* :class:`StoreEntryPolicy` — the Prefect cache key of a stage task is the stage's key in the
  :class:`~lorasuite_core.stage_store.StageStore`, and Prefect's cache record is honoured only
  while the store entry it names is complete.  If the entry has been deleted (or was never
  completed), the policy returns no key: the task runs, and the stage either finds the entry
  after all or recomputes it.  So a Prefect record can never hand out a dangling URI.
* Retries: heavy tasks retry twice with exponential backoff (1 s, 2 s), except on a
  :class:`~lorasuite_core.errors.LorasuiteError` — bad input does not get better by retrying,
  and storage errors have already been retried with backoff by ``lorasuite_core.storage``.
* Logging: :func:`forward_core_logs` hands ``lorasuite_core`` records to Prefect's API log
  handlers while inside a run (what ``PREFECT_LOGGING_EXTRA_LOGGERS`` does, minus the warnings
  outside runs), so the numerics' own lines land in the run's log; :func:`log_stage` reports,
  through the run logger, whether a stage was computed or reused.  URIs are logged redacted.
* :data:`TORCH_MODEL_LOCK` serialises, within one worker process, the tasks that load a whole
  torch model (activations, LFT, baseline training, evaluation): transformers sets
  process-global torch defaults while loading, and one device runs one such job at a time.
  Spread them over processes/machines with a distributed task runner instead.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.stage_store import StageResult, StageStore
from lorasuite_core.storage import redact_uri

GPU_TAG = "lorasuite-gpu"
CORE_LOGGER = "lorasuite_core"
TORCH_MODEL_LOCK = threading.Lock()
_forward_lock = threading.Lock()


@dataclass
class StoreEntryPolicy(CachePolicy):
    """Cache key = the store key of ``stage`` (``key_of(inputs)``), only while its entry is complete."""

    stage: str = ""
    key_of: Optional[Callable[[dict[str, Any]], str]] = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        key = self.key_of(inputs)
        if not StageStore.at(inputs["store"]).is_complete(self.stage, key):
            return None
        return f"lorasuite-{self.stage}-{key}"


def not_a_user_error(task, task_run, state) -> bool:
    """retry_condition_fn: retry anything but a LorasuiteError."""
    return not isinstance(state.data, LorasuiteError)


def stage_task_options(stage: str, key_of: Callable[[dict[str, Any]], str], *, heavy: bool = False,
                       retries: int = 2) -> dict[str, Any]:
    """Keyword arguments of ``@task`` for a store-backed stage."""
    return dict(
        name=stage.replace("_", "-"),
        cache_policy=StoreEntryPolicy(stage=stage, key_of=key_of),
        persist_result=True,
        result_serializer="json",
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


_FORWARDER = _RunLogForwarder()


def forward_core_logs() -> None:
    """Send ``lorasuite_core`` records to the current run's log; idempotent.

    Levels are left alone: the ``lorasuite_core`` logger's effective level decides (INFO under
    ``lorasuite migrate``, WARNING under ``-q`` and under Prefect's default logging config, whose
    root logger is at WARNING; a worker that wants the INFO lines sets a ``lorasuite_core`` level
    in its logging config, ``PREFECT_LOGGING_SETTINGS_PATH``).
    """
    core = logging.getLogger(CORE_LOGGER)
    with _forward_lock:
        if _FORWARDER not in core.handlers:
            core.addHandler(_FORWARDER)


def log_stage(result: StageResult) -> StageResult:
    """One line in the run log: computed or reused, where, how long."""
    verb = "reused" if result.reused else "computed"
    get_run_logger().info("%s %s: %s (%.2fs)", verb, result.stage, redact_uri(result.uri), result.seconds)
    return result


def run_stage(fn: Callable[..., StageResult], *args: Any, torch_model: bool = False) -> StageResult:
    """Call a lorasuite_core stage with core logs forwarded (and the torch-model lock if asked)."""
    forward_core_logs()
    if torch_model:
        with TORCH_MODEL_LOCK:
            return log_stage(fn(*args))
    return log_stage(fn(*args))
