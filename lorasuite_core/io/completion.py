"""Completion manifests: how a directory says it was published completely, and how that is checked.

Design
------
* **Markers.** A finished publication (:mod:`lorasuite_core.io.publish`) carries
  ``_LORASUITE_COMPLETE.json`` (:data:`COMPLETE_MARKER`: file list with sizes and sha256,
  :func:`build_completion_manifest`), written last.  While a remote publication copies into
  place, the destination holds ``_LORASUITE_PUBLISHING.json`` (:data:`PUBLISHING_MARKER`)
  instead.  Readers call :func:`is_complete` (manifest valid, every listed file there with
  its size).
* **Integrity.** A completion manifest vouches only for the files it lists: one
  listing none is invalid (:func:`manifest_problem`).  :func:`verify_local_dir` /
  :func:`verify_dir` check every listed file against its size *and sha256* (locally
  memoised per process on the files' size, mtime and inode, so repeated reads of one entry
  hash it once); downloads are verified the same way
  (:mod:`lorasuite_core.io.materialize`), and a cached download that no longer matches is
  discarded and fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorasuite_core.io.files import is_downloadable, list_files, read_json, sha256_file, sha256_stream, strip_slash
from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import as_uri, is_local_fs, join_uri, redact_uri, resolve

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_LORASUITE_COMPLETE.json"
PUBLISHING_MARKER = "_LORASUITE_PUBLISHING.json"
MARKER_FORMAT = "lorasuite.complete/v1"


def build_completion_manifest(local_dir: str | os.PathLike) -> dict[str, Any]:
    """Completion manifest for the files under ``local_dir`` (sizes + sha256), marker excluded."""
    root = Path(local_dir)
    files = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        files.append({"path": rel, "size": file.stat().st_size, "sha256": sha256_file(file)})
    return {
        "format": MARKER_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "file_count": len(files),
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }


def _listed_path(entry: Any) -> str | None:
    """The relative path of a manifest entry, or None when it is malformed or escapes the directory."""
    rel = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        return None
    return rel


def manifest_problem(data: Any) -> str | None:
    """Why parsed JSON is not a valid completion manifest, or None: our format, and a non-empty list of
    files (a manifest vouches only for the files it lists, so one listing none vouches for nothing),
    each with a relative path inside the directory, a size and a sha256."""
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("files"), list):
        return f"{COMPLETE_MARKER} of unknown format"
    if not data["files"]:
        return f"{COMPLETE_MARKER} lists no files"
    for entry in data["files"]:
        if _listed_path(entry) is None or not isinstance(entry.get("size"), int) \
                or not isinstance(entry.get("sha256"), str):
            return f"{COMPLETE_MARKER} lists an invalid entry"
    return None


def read_completion_manifest(uri: str | os.PathLike, *, storage_options=None,
                             retry: RetryPolicy | None = None) -> dict[str, Any] | None:
    """The parsed ``_LORASUITE_COMPLETE.json`` of a directory, or None if absent/invalid."""
    try:
        data = read_json(join_uri(str(as_uri(uri)), COMPLETE_MARKER),
                         storage_options=storage_options, retry=retry)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except ValueError as exc:
        logger.warning("ignoring unreadable completion manifest: %s", exc)
        return None
    problem = manifest_problem(data)
    if problem is not None:
        logger.warning("ignoring invalid completion manifest under %s: %s", redact_uri(str(uri)), problem)
        return None
    return data


def is_complete(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> bool:
    """True when the directory has a valid completion manifest and every listed file with its size."""
    marker = read_completion_manifest(uri, storage_options=storage_options, retry=retry)
    if marker is None:
        return False
    fs, path = resolve(uri, storage_options)
    files = retry_call(lambda: list_files(fs, path), retry, str(uri), "list")
    for entry in marker["files"]:
        info = files.get(entry.get("path"))
        if info is None or int(info.get("size") or 0) != entry.get("size"):
            logger.debug("%s: %s missing or of unexpected size", redact_uri(str(uri)), entry.get("path"))
            return False
    return True


_VERIFIED: dict[tuple[str, bool], tuple] = {}
_VERIFIED_LOCK = threading.Lock()


def verify_local_dir(directory: str | os.PathLike, *, only_downloadable: bool = False) -> str | None:
    """Why a local directory does not match its completion manifest, or None when it does.

    Every listed file must exist with the listed size and sha256 (``only_downloadable``: only
    the allowlisted kinds :func:`~lorasuite_core.io.materialize.materialize_dir` fetches).  The
    sha256 pass is memoised per process on the files' (size, mtime, inode) and the manifest's, so
    an unchanged entry is hashed once; any in-place change of a file changes its mtime and forces
    a re-check.
    """
    root = Path(directory)
    marker_file = root / COMPLETE_MARKER
    try:
        marker = json.loads(marker_file.read_text())
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER}"
    except (OSError, ValueError) as error:
        return f"unreadable {COMPLETE_MARKER} ({type(error).__name__})"
    problem = manifest_problem(marker)
    if problem is not None:
        return problem
    st = marker_file.stat()
    listed, stats = [], [(COMPLETE_MARKER, st.st_size, st.st_mtime_ns, st.st_ino)]
    for entry in marker["files"]:
        rel = _listed_path(entry)
        if rel is None:
            return f"{COMPLETE_MARKER} lists an invalid path"
        if only_downloadable and not is_downloadable(rel):
            continue
        try:
            st = (root / rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return f"{rel} is listed in {COMPLETE_MARKER} but missing"
        if st.st_size != entry.get("size"):
            return f"{rel} has {st.st_size} bytes, {COMPLETE_MARKER} lists {entry.get('size')}"
        listed.append((rel, entry.get("sha256")))
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    memo_key, token = (str(root.resolve()), only_downloadable), tuple(stats)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(memo_key) == token:
            return None
    for rel, digest in listed:
        if sha256_file(root / rel) != digest:
            return f"{rel} does not match its sha256 in {COMPLETE_MARKER}"
    with _VERIFIED_LOCK:
        _VERIFIED[memo_key] = token
    return None


def verify_dir(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str | None:
    """Why a directory (local or remote) does not match its completion manifest, or None when every
    listed file is there with its size and sha256 (remote files are streamed through the hash)."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        return verify_local_dir(path)
    root = strip_slash(path)
    try:
        marker = json.loads(retry_call(lambda: fs.cat_file(f"{root}/{COMPLETE_MARKER}"), retry, str(uri), "read"))
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER}"
    except ValueError as error:
        return f"unreadable {COMPLETE_MARKER} ({type(error).__name__})"
    problem = manifest_problem(marker)
    if problem is not None:
        return problem
    files = retry_call(lambda: list_files(fs, root), retry, str(uri), "list")
    for entry in marker["files"]:
        rel = entry["path"]
        info = files.get(rel)
        if info is None:
            return f"{rel} is listed in {COMPLETE_MARKER} but missing"
        if int(info.get("size") or 0) != entry["size"]:
            return f"{rel} has {info.get('size')} bytes, {COMPLETE_MARKER} lists {entry['size']}"

        def digest(rel=rel) -> str:
            with fs.open(f"{root}/{rel}", "rb") as handle:
                return sha256_stream(handle)
        if retry_call(digest, retry, join_uri(str(uri), rel), "verify") != entry["sha256"]:
            return f"{rel} does not match its sha256 in {COMPLETE_MARKER}"
    return None
