"""Atomic publication: a finished directory appears at its destination all at once, or not at all.

Design
------
* :func:`publish_dir_atomic` publishes a finished local directory.  Locally: copy into a
  temporary sibling directory, write the completion manifest in it last, ``os.replace`` it into
  place.  Remotely: upload everything under ``<dest>.tmp-<uuid>/`` (the destination is untouched
  while the slow part runs), copy the objects into place server-side, and write
  ``_LORASUITE_COMPLETE.json`` (file list with sizes and sha256,
  :mod:`lorasuite_core.io.completion`) LAST.  Readers call
  :func:`~lorasuite_core.io.completion.is_complete`.  On failure the temporary prefix is deleted
  and the destination is left as it was.
* Remotely, the first object written into the destination is ``_LORASUITE_PUBLISHING.json``
  (removed after the completion manifest): a publication cut short by a crash or a dropped
  connection during the server-side copy leaves a destination that is recognisably *ours and
  partial* (:func:`~lorasuite_core.io.outputs.output_state` ``"partial"``), which the next
  publication replaces without ``overwrite``.  A publication replaces only what is ours
  (:func:`~lorasuite_core.io.outputs.check_replaceable`).
* Published files get the mode a plain ``open`` gives (``0666 & ~umask``), not ``mkstemp``'s 0600.
* :func:`publishing` stages an output in a private local directory and publishes it when the
  body succeeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lorasuite_core.io.completion import (
    COMPLETE_MARKER, MARKER_FORMAT, PUBLISHING_MARKER, build_completion_manifest,
)
from lorasuite_core.io.files import follow_umask, list_files, remove_remote_prefix, strip_slash, write_local_atomic
from lorasuite_core.io.outputs import check_replaceable, output_state
from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import describe_error, is_local_fs, join_uri, redact_uri, resolve

logger = logging.getLogger(__name__)


def publish_dir_atomic(local_dir: str | os.PathLike, dest_uri: str | os.PathLike, *, overwrite: bool = False,
                       storage_options=None, retry: RetryPolicy | None = None) -> str:
    """Publish a finished local directory so that readers never see a partial result.

    Returns ``dest_uri`` (as a string).  Raises DestinationExistsError for a non-empty
    destination unless ``overwrite``; see the module docstring for the protocol.
    """
    source = Path(local_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"local directory to publish not found: {source}")
    marker = build_completion_manifest(source)
    if not marker["files"]:
        raise ValueError(f"refusing to publish an empty directory: {source}")
    fs, path = resolve(dest_uri, storage_options)
    state = output_state(dest_uri, storage_options=storage_options, retry=retry)
    check_replaceable(str(dest_uri), state, overwrite, warn=False)   # the pre-run check (check_output) warned
    if is_local_fs(fs):
        _publish_local(source, Path(path), marker)
    else:
        _publish_remote(fs, path, str(dest_uri), source, marker, state, retry)
    logger.debug("published %d file(s), %d bytes to %s",
                marker["file_count"], marker["total_bytes"], redact_uri(str(dest_uri)))
    return str(dest_uri)


@contextlib.contextmanager
def publishing(dest_uri: str | os.PathLike, *, overwrite: bool = False, kind: str = "publish") -> Iterator[Path]:
    """Stage an output: the body writes into a private local directory, which is then published to
    ``dest_uri`` atomically (:func:`publish_dir_atomic`); nothing reaches ``dest_uri`` if the body fails."""
    from lorasuite_core.io.tempdirs import private_tempdir

    with private_tempdir(kind) as staged:
        yield staged
        publish_dir_atomic(staged, dest_uri, overwrite=overwrite)


def _marker_bytes(marker: dict[str, Any]) -> bytes:
    return (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------- local


def _copy_local_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    follow_umask(target)


def _publish_local(source: Path, dest: Path, marker: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    try:
        for entry in marker["files"]:
            _copy_local_file(source / entry["path"], staging / entry["path"])
        write_local_atomic(staging / COMPLETE_MARKER, _marker_bytes(marker))
        _swap_local_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_local_dir(staging: Path, dest: Path) -> None:
    """Rename ``staging`` onto ``dest``; a previous ``dest`` is moved aside, then removed."""
    if not dest.exists() or not any(dest.iterdir()):
        os.replace(staging, dest)
        return
    retired = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex}"
    os.replace(dest, retired)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(retired, dest)
        raise
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- remote


def _publish_remote(fs, path: str, uri: str, source: Path, marker: dict[str, Any], state: str,
                    retry: RetryPolicy | None) -> None:
    dest = strip_slash(path)
    existing = retry_call(lambda: list_files(fs, dest), retry, uri, "list") if state != "empty" else {}
    staging = f"{dest}.tmp-{uuid.uuid4().hex}"
    promoted: list[str] = []
    claimed = False
    try:
        _stage_remote(fs, source, staging, uri, marker, retry)
        # Claim the destination first: from here on an interruption leaves it recognisably ours.
        claim = _marker_bytes({"format": MARKER_FORMAT, "publishing": staging.rsplit("/", 1)[-1],
                               "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        retry_call(lambda: fs.pipe_file(f"{dest}/{PUBLISHING_MARKER}", claim), retry, uri, "claim destination")
        claimed = True
        if COMPLETE_MARKER in existing:
            retry_call(lambda: fs.rm_file(f"{dest}/{COMPLETE_MARKER}"), retry, uri, "retract old manifest")
        _promote_remote(fs, staging, dest, uri, marker, retry, promoted)
        stale = set(existing) - {entry["path"] for entry in marker["files"]} - {COMPLETE_MARKER, PUBLISHING_MARKER}
        _remove_remote_files(fs, dest, sorted(stale), uri, retry)
        _write_marker(fs, dest, uri, marker, retry)
        _best_effort(lambda: retry_call(lambda: fs.rm_file(f"{dest}/{PUBLISHING_MARKER}"), retry, uri,
                                        "release claim"),
                     uri, "remove the publishing marker")
    except BaseException:
        if state == "empty" and claimed:
            _best_effort(lambda: _remove_remote_files(fs, dest, [*promoted, PUBLISHING_MARKER], uri, retry),
                         uri, "undo promotion")
        raise
    finally:
        _best_effort(lambda: retry_call(lambda: remove_remote_prefix(fs, staging), retry, uri, "delete staging"),
                     uri, "delete staging prefix")
        fs.invalidate_cache(dest)


def _stage_remote(fs, source: Path, staging: str, uri: str, marker: dict[str, Any],
                  retry: RetryPolicy | None) -> None:
    for entry in marker["files"]:
        rel = entry["path"]
        local_file, remote_file = str(source / rel), f"{staging}/{rel}"
        retry_call(lambda: fs.put_file(local_file, remote_file), retry, join_uri(uri, rel), "upload")


def _promote_remote(fs, staging: str, dest: str, uri: str, marker: dict[str, Any],
                    retry: RetryPolicy | None, promoted: list[str]) -> None:
    for entry in marker["files"]:
        rel = entry["path"]
        retry_call(lambda: fs.cp_file(f"{staging}/{rel}", f"{dest}/{rel}"), retry, join_uri(uri, rel), "copy")
        promoted.append(rel)


def _write_marker(fs, dest: str, uri: str, marker: dict[str, Any], retry: RetryPolicy | None) -> None:
    """Write the completion manifest; the very last write of a publication."""
    data = _marker_bytes(marker)
    retry_call(lambda: fs.pipe_file(f"{dest}/{COMPLETE_MARKER}", data), retry, uri, "write completion manifest")


def _remove_remote_files(fs, dest: str, relpaths: Iterable[str], uri: str, retry: RetryPolicy | None) -> None:
    paths = [f"{dest}/{rel}" for rel in relpaths]
    if paths:
        retry_call(lambda: fs.rm(paths), retry, uri, "delete")


def _best_effort(fn: Callable[[], Any], uri: str, what: str) -> None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - cleanup must not mask the original error
        logger.warning("%s for %s failed: %s", what, redact_uri(uri), describe_error(error))
