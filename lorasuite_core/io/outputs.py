"""Output checks: whether a run may write its output where it was told to (the one pre-run check).

Design
------
* **Ownership.** :func:`output_state` tells ``empty`` / ``complete`` (our
  completion manifest, every listed file verified by size and sha256) /
  ``corrupt`` (our manifest, but invalid or no longer matching the files) /
  ``partial`` (our in-progress marker, no manifest) / ``foreign`` (anything
  else).  A publication replaces only what is ours (:func:`check_replaceable`):
  ``foreign`` content is refused even with ``overwrite``; ``complete`` needs
  ``overwrite``; ``partial`` and ``corrupt`` are replaced with one warning.
* **Location.** :func:`check_output_location` refuses an output that is empty, the current
  directory (or one of its parents), the filesystem or bucket root, an input, a
  parent of an input or a directory inside one.
* :func:`check_output` (both checks, directories) and :func:`check_output_file` (single JSON
  results, ours when they carry :data:`FILE_FORMAT_KEY`) are the one pre-run check of every
  subcommand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from lorasuite_core.io.completion import COMPLETE_MARKER, MARKER_FORMAT, PUBLISHING_MARKER, verify_dir
from lorasuite_core.io.files import list_files, read_json, strip_slash
from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import (
    LOCAL_PROTOCOLS, StorageError, as_uri, is_local_fs, join_uri, protocol_of, redact_uri, resolve,
)

logger = logging.getLogger(__name__)

#: The key that marks a single JSON file as lorasuite's own output (e.g. ``lorasuite eval --output``).
FILE_FORMAT_KEY = "lorasuite_format"


class DestinationExistsError(StorageError):
    """The publication destination is not empty and overwrite was not requested."""


class UnsafeOutputError(StorageError):
    """An output location that would overwrite an input, the working directory or foreign content."""


def output_state(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str:
    """``empty`` | ``complete`` | ``corrupt`` | ``partial`` | ``foreign``.

    ``complete``: our completion manifest, every file it lists present with its size and sha256
    (:func:`~lorasuite_core.io.completion.verify_dir`), so a rerun or a fleet may skip it as done.
    ``corrupt``: our manifest (our format tag) that is invalid (lists no files) or that the files no
    longer match.  ``partial``: our in-progress marker, no manifest.  A file, or a directory holding
    anything else, is ``foreign``.
    """
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        local = Path(path)
        if local.is_symlink() or local.is_file():
            return "foreign"
        if not local.exists() or not any(local.iterdir()):
            return "empty"
        names = {p.name for p in local.iterdir()}
    else:
        try:
            names = set(retry_call(lambda: list_files(fs, path), retry, str(uri), "list"))
        except NotADirectoryError:
            return "foreign"
        if not names:
            return "empty"
    if COMPLETE_MARKER in names:
        try:
            data = read_json(join_uri(str(as_uri(uri)), COMPLETE_MARKER), storage_options=storage_options, retry=retry)
        except (ValueError, OSError):
            data = None
        if isinstance(data, dict) and data.get("format") == MARKER_FORMAT:
            problem = verify_dir(uri, storage_options=storage_options, retry=retry)
            if problem is None:
                return "complete"
            logger.info("output %s: %s", redact_uri(str(uri)), problem)
            return "corrupt"
    return "partial" if PUBLISHING_MARKER in names else "foreign"


def check_replaceable(uri: str, state: str, overwrite: bool, *, warn: bool = True) -> None:
    """Raise DestinationExistsError unless a destination in ``state`` may be (re)written; ``warn``: say
    (once per run: the pre-run check says it, the publication itself does not) that ours is replaced."""
    if state == "foreign":
        raise DestinationExistsError(
            f"output {redact_uri(uri)} exists and was not written by lorasuite; refusing to replace it "
            "(choose another output or empty it yourself)")
    if state == "complete" and not overwrite:
        raise DestinationExistsError(
            f"output {redact_uri(uri)} already holds a lorasuite publication; pass --overwrite to replace it")
    if state == "partial" and warn:
        logger.warning("output %s holds an interrupted publication of ours; replacing it", redact_uri(uri))
    if state == "corrupt" and warn:
        logger.warning("output %s holds a publication of ours that no longer matches its completion manifest; "
                       "replacing it", redact_uri(uri))


def check_output(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], overwrite: bool, *,
                 skip_finished: bool = False, storage_options=None) -> bool:
    """The one pre-run check of every subcommand's output directory: a safe location
    (:func:`check_output_location`), then one that a publication may replace (:func:`check_replaceable`:
    empty, or our own publication, with ``overwrite`` when it is finished).  Returns whether there is work
    to do: False only for a finished (verified) publication with ``skip_finished`` and not ``overwrite``
    (a fleet rerun skips it)."""
    check_output_location(output, inputs)
    state = output_state(output, storage_options=storage_options)
    if state == "complete" and skip_finished and not overwrite:
        return False
    check_replaceable(str(output), state, overwrite)
    return True


def check_output_file(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                      overwrite: bool) -> None:
    """The pre-run check for a single-file output: a safe location (never an input, inside or above
    one), and either nothing there or a JSON file of ours (:data:`FILE_FORMAT_KEY`) with ``overwrite``."""
    check_output_location(output, inputs)
    fs, path = resolve(output)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return
    if info.get("type") != "file":
        raise UnsafeOutputError(f"output {redact_uri(str(output))} is a directory; name a file")
    try:
        data = read_json(output)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not (isinstance(data, dict) and str(data.get(FILE_FORMAT_KEY, "")).startswith("lorasuite.")):
        raise DestinationExistsError(f"output {redact_uri(str(output))} exists and was not written by lorasuite; "
                                     "refusing to replace it")
    if not overwrite:
        raise DestinationExistsError(f"output {redact_uri(str(output))} already holds a lorasuite result; "
                                     "pass --overwrite to replace it")


def _normalised_location(ref: str) -> tuple[str, str]:
    """(protocol, absolute path without trailing slash) of a local path or URI."""
    text = str(ref).strip()
    protocol = protocol_of(text)
    if protocol in LOCAL_PROTOCOLS:
        local = text[len("file://"):] if text.startswith("file://") else text
        return "file", str(Path(local).expanduser().resolve())
    return protocol, "/" + urlsplit(text).netloc + "/" + urlsplit(text).path.strip("/")


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def check_output_location(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output that a publication could not replace without destroying something.

    ``inputs``: ``{what: reference}`` of every model, adapter, data file and cache the run uses
    (None is skipped).  Refused: an empty string, the current directory or one of its
    parents, a filesystem or bucket root, any input, a parent of an input, a directory inside an
    input.  Raises :class:`UnsafeOutputError`.
    """
    text = str(output).strip() if output is not None else ""
    if not text:
        raise UnsafeOutputError("output is empty (an unset shell variable?); name the directory to write")
    protocol, out = _normalised_location(text)
    shown = redact_uri(text)
    if protocol == "file":
        if _within(str(Path.cwd().resolve()), out):
            raise UnsafeOutputError(f"output {shown} is the current directory or one of its parents; "
                                    "name a new directory")
        if Path(out).parent == Path(out):
            raise UnsafeOutputError(f"output {shown} is the filesystem root")
    elif out.strip("/").count("/") == 0:
        raise UnsafeOutputError(f"output {shown} is a bucket root; name a prefix inside it")
    for what, ref in inputs.items():
        if not ref:
            continue
        ref = str(ref)   # a hub id is compared as the relative path it would be: harmless
        in_protocol, inp = _normalised_location(ref)
        if in_protocol != protocol:
            continue
        if _within(inp, out):
            raise UnsafeOutputError(f"output {shown} is the {what} or a directory above it; "
                                    "writing there would destroy the input")
        if _within(out, inp):
            raise UnsafeOutputError(f"output {shown} lies inside the {what} {redact_uri(ref)}; name a directory outside it")


def check_not_a_file(uri: str | os.PathLike, what: str, *, storage_options=None,
                     retry: RetryPolicy | None = None) -> None:
    """Raise UnsafeOutputError when ``uri`` names an existing file where a directory (prefix) belongs."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        is_file = Path(path).is_file()
    else:
        is_file = retry_call(lambda: fs.isfile(strip_slash(path)), retry, str(uri), "inspect")
    if is_file:
        raise UnsafeOutputError(f"{what} {redact_uri(str(uri))} is a file, not a directory")
