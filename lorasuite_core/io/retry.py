"""The one retry layer of storage operations.

Design
------
* **Retries.** Remote operations go through :func:`with_retries`: exponential
  backoff with jitter on transient errors (``OSError``, ``ConnectionError``,
  ``TimeoutError``, botocore connection / HTTP errors, aiohttp client errors),
  never on "answer" errors (not found, permission denied, exists), and a final
  :class:`StorageUnavailableError` naming the URI, the attempt count and the last
  error.  Local-disk operations are not retried.
* **One layer.** botocore and s3fs are configured to make one attempt per call
  (:func:`lorasuite_core.io.uris.resolve`), so that :func:`with_retries` alone
  decides, waits and logs, and "after N attempts" counts the requests sent.
  Every storage module calls :func:`retry_call` with an optional
  :class:`RetryPolicy`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from lorasuite_core.io.uris import StorageError, describe_error, redact_uri

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StorageUnavailableError(StorageError):
    """A remote operation kept failing with transient errors."""

    def __init__(self, uri: str, attempts: int, last_error: BaseException | str):
        self.uri = redact_uri(str(uri))
        self.attempts = attempts
        self.last_error = last_error
        detail = describe_error(last_error) if isinstance(last_error, BaseException) else str(last_error)
        super().__init__(f"storage unavailable: {self.uri} after {attempts} attempt(s): {detail}")

    def __reduce__(self):
        # Crossing a process boundary (a distributed task runner) keeps the text, not the cause.
        last_error = self.last_error
        text = describe_error(last_error) if isinstance(last_error, BaseException) else str(last_error)
        return (self.__class__, (self.uri, self.attempts, text))


def _transient_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as bce

        types += [bce.ConnectionError, bce.HTTPClientError]
    except ImportError:  # pragma: no cover - s3 support not installed
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = _transient_error_types()
NEVER_RETRY: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    StorageError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters for :func:`with_retries`."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0


DEFAULT_RETRY_POLICY = RetryPolicy()


def _is_retryable(error: BaseException, retry_on: tuple[type[BaseException], ...]) -> bool:
    return isinstance(error, retry_on) and not isinstance(error, NEVER_RETRY)


def _backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Exponential backoff with "equal jitter": uniform in [d/2, d], d = base * 2**(attempt-1)."""
    delay = min(max_delay, base_delay * (2 ** (attempt - 1)))
    return random.uniform(delay / 2, delay)


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
    uri: str = "<unknown>",
    what: str = "storage operation",
) -> T:
    """Call ``fn()`` until it succeeds, retrying transient errors with backoff.

    Errors not in ``retry_on`` (and "answer" errors such as FileNotFoundError or
    PermissionError) propagate at once.  After ``attempts`` transient failures,
    raises :class:`StorageUnavailableError` chained to the last error.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    safe_uri = redact_uri(uri)
    last_error: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except BaseException as error:  # noqa: BLE001 - filtered just below
            if not _is_retryable(error, retry_on):
                raise
            last_error = error
            if attempt == attempts:
                break
            delay = _backoff_delay(attempt, base_delay, max_delay)
            logger.warning(
                "%s on %s failed (attempt %d/%d): %s; retrying in %.2fs",
                what, safe_uri, attempt, attempts, describe_error(error), delay,
            )
            time.sleep(delay)
    logger.error("%s on %s failed after %d attempt(s): %s", what, safe_uri, attempts, describe_error(last_error))
    raise StorageUnavailableError(safe_uri, attempts, last_error) from last_error


def retry_call(fn: Callable[[], T], policy: RetryPolicy | None, uri: str, what: str) -> T:
    """:func:`with_retries` under ``policy`` (None: :data:`DEFAULT_RETRY_POLICY`)."""
    policy = policy or DEFAULT_RETRY_POLICY
    return with_retries(
        fn, attempts=policy.attempts, base_delay=policy.base_delay,
        max_delay=policy.max_delay, uri=uri, what=what,
    )
