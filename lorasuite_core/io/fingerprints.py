"""Fingerprints: cheap identities of a file or a directory, usable as cache keys.

Design
------
* :func:`file_fingerprint` and :func:`dir_fingerprint` hash sizes plus ETag or inode+mtime from
  ``fs.info`` / listings (:func:`lorasuite_core.io.files.listing_digest`), no content read:
  "same model / same file" for the stage store's keys.  The completion manifest is left out, so
  republishing identical files is the same model on object stores.
"""

from __future__ import annotations

import os
from typing import Iterable

from lorasuite_core.io.completion import COMPLETE_MARKER
from lorasuite_core.io.files import info_digest, list_files, listing_digest, matches
from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import is_local_fs, redact_uri, resolve


def file_fingerprint(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str:
    """Cheap identity of one file: sha256 hex over (size, ETag or inode+mtime); no content read."""
    fs, path = resolve(uri, storage_options)
    if not is_local_fs(fs):
        fs.invalidate_cache(path)
    info = retry_call(lambda: fs.info(path), retry, str(uri), "stat")
    if info.get("type") != "file":
        raise IsADirectoryError(f"{redact_uri(str(uri))} is not a file")
    return info_digest(info, salt="file/v1")


def dir_fingerprint(uri: str | os.PathLike, patterns: Iterable[str] = ("*.json", "*.safetensors"), *,
                    storage_options=None, retry: RetryPolicy | None = None) -> str:
    """sha256 hex over sorted (relative name, size, ETag/mtime) of files matching ``patterns``.

    The completion manifest is excluded (republishing identical files is the same model
    on object stores).  FileNotFoundError if the directory holds no files at all.
    """
    fs, path = resolve(uri, storage_options)
    files = retry_call(lambda: list_files(fs, path), retry, str(uri), "list")
    if not files:
        raise FileNotFoundError(f"no files under {redact_uri(str(uri))}")
    patterns = tuple(patterns)
    selected = {rel: info for rel, info in files.items() if rel != COMPLETE_MARKER and matches(rel, patterns)}
    return listing_digest(selected, salt="dir/v1")
