"""Line-oriented text input (calibration text, prompt files), streamed from a local path or storage URI.

* :func:`open_text` opens ``ref`` for UTF-8 reading (strict) and turns every way that can fail --
  missing, a directory, not UTF-8, unreadable (permissions, network) -- into one
  :class:`~lorasuite_core.errors.LorasuiteError` that starts with ``what`` (e.g. "prompt file
  s3://b/p.jsonl"; the caller passes the redacted name).
* :func:`lines` yields ``(number, first <= limit characters, whole?)`` per line and skips the tail of a
  longer line in pieces, so one huge line never sits in memory; a NUL byte is refused (a binary file).
* :func:`jsonl_records` yields ``(number, record)`` per non-blank JSON line; a line longer than
  ``limit`` or not JSON is refused naming its number.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
from typing import Any, Iterator

from lorasuite_core.errors import LorasuiteError

SKIP_PIECE = 1 << 16


@contextlib.contextmanager
def open_text(ref: str, what: str) -> Iterator[io.TextIOBase]:
    """A UTF-8 text handle on ``ref``; errors while opening *or reading* are one LorasuiteError."""
    from lorasuite_core.io.uris import describe_error, resolve

    try:
        fs, location = resolve(ref)
        if fs.isdir(location):
            raise LorasuiteError(f"{what} is a directory, not a file")
        with fs.open(location, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as handle:
            yield handle
    except FileNotFoundError:
        raise LorasuiteError(f"{what} does not exist") from None
    except UnicodeDecodeError as exc:
        raise LorasuiteError(f"{what} is not UTF-8 text ({exc.reason}): a binary file?") from None
    except IsADirectoryError:
        raise LorasuiteError(f"{what} is a directory, not a file") from None
    except (LorasuiteError, KeyboardInterrupt):
        raise
    except OSError as exc:
        raise LorasuiteError(f"{what} cannot be read: {describe_error(exc)}") from None


def refuse_nul(text: str, what: str) -> None:
    if "\0" in text:
        raise LorasuiteError(f"{what} holds NUL bytes: a binary file, not text")


def lines(handle, limit: int, what: str) -> Iterator[tuple[int, str, bool]]:
    """``(number, first <= limit characters, whole line?)`` per line; a longer line's tail is skipped in pieces."""
    for number in itertools.count(1):
        line = handle.readline(limit)
        if not line:
            return
        refuse_nul(line, what)
        skipped = 0
        if not line.endswith("\n") and len(line) == limit:
            while True:
                piece = handle.readline(SKIP_PIECE)
                refuse_nul(piece, what)
                skipped += len(piece.rstrip("\n"))
                if not piece or piece.endswith("\n") or len(piece) < SKIP_PIECE:
                    break
        yield number, line, skipped == 0


def jsonl_records(handle, limit: int, what: str) -> Iterator[tuple[int, Any]]:
    """``(number, parsed record)`` per non-blank line of a JSONL handle."""
    for number, line, whole in lines(handle, limit, what):
        if not whole:
            raise LorasuiteError(f"{what}: line {number} is longer than {limit} characters; split it into shorter "
                                 f"records")
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorasuiteError(f"{what}: line {number} is not JSON ({exc.msg})") from None
