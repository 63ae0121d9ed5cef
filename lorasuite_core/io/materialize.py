"""Materialising: a remote model or adapter directory as a local path, downloaded once.

Design
------
* :func:`materialize_dir` downloads a remote HF model or PEFT adapter directory once into a
  content-addressed cache (the download folder, :func:`default_download_dir`; the key hashes
  the listing's names, sizes and ETags/mtimes, so a changed object gives a new key) and returns
  the local path; local paths are returned as they are.
* Only safe, allowlisted kinds are fetched (:func:`lorasuite_core.io.files.is_downloadable`);
  pickle-based weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) are never
  downloaded, and a directory whose only weights are pickles is refused
  (:class:`UnsafeArtifactError`).
* Downloads go to a temporary sibling that is renamed into place, so the cache never holds a
  partial directory; if the source carries a completion manifest, sizes and sha256 are verified
  (:func:`lorasuite_core.io.completion.verify_local_dir`; ``require_complete=True`` also refuses
  a source without one).  A cached copy that no longer matches is discarded and fetched again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorasuite_core.io.completion import COMPLETE_MARKER, verify_local_dir
from lorasuite_core.io.files import (
    ALLOWED_PATTERNS, PICKLE_PATTERNS, WEIGHT_PATTERNS, discard_dir, is_downloadable, list_files, listing_digest,
    matches, strip_slash,
)
from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import StorageError, is_local_fs, join_uri, redact_uri, resolve

logger = logging.getLogger(__name__)

_CACHE_KEY_VERSION = "lorasuite-materialize/v1"


class UnsafeArtifactError(StorageError):
    """A directory only offers pickle-based weights, which are never loaded."""


class IncompleteArtifactError(StorageError):
    """A directory required to be completely published has no completion manifest."""


class IntegrityError(StorageError):
    """Files do not match the completion manifest they were published with."""


def default_download_dir() -> Path:
    """``$LORASUITE_DOWNLOAD_DIR`` (old name ``$LORASUITE_CACHE_DIR``) or ``~/.cache/lorasuite/materialized``."""
    from lorasuite_core.settings import settings

    return settings().download_dir.expanduser()


def select_downloadable(uri: str, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Allowlisted files of a listing; UnsafeArtifactError if the only weights are pickles."""
    allowed = {rel: info for rel, info in files.items() if is_downloadable(rel)}
    pickles = sorted(rel for rel in files if matches(rel, PICKLE_PATTERNS))
    has_safetensors = any(matches(rel, WEIGHT_PATTERNS) for rel in allowed)
    if pickles and not has_safetensors:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise UnsafeArtifactError(
            f"{redact_uri(uri)} has only pickle-based weights ({shown}); safetensors is required "
            "(convert the checkpoint to *.safetensors and re-upload)"
        )
    skipped = sorted(set(files) - set(allowed))
    if skipped:
        logger.info("materialize %s: skipping %d non-allowlisted file(s): %s",
                    redact_uri(uri), len(skipped), ", ".join(skipped[:5]))
    return allowed


def materialize_dir(uri: str | os.PathLike, local_cache_root: str | os.PathLike | None = None, *,
                    require_complete: bool = False, storage_options=None,
                    retry: RetryPolicy | None = None) -> Path:
    """Local path of a model/adapter directory, downloading a remote one once into the cache.

    ``require_complete`` refuses a remote directory without a completion manifest
    (use it for directories written by :func:`lorasuite_core.io.publish.publish_dir_atomic`).
    """
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        local = Path(path)
        if not local.is_dir():
            raise FileNotFoundError(f"local directory not found: {local}")
        return local
    safe_uri = redact_uri(str(uri))
    files = retry_call(lambda: list_files(fs, path), retry, str(uri), "list")
    if not files:
        raise FileNotFoundError(f"no files under {safe_uri}")
    if require_complete and COMPLETE_MARKER not in files:
        raise IncompleteArtifactError(f"{safe_uri} has no {COMPLETE_MARKER}: not (yet) completely published")
    selected = select_downloadable(str(uri), files)
    if not selected:
        raise FileNotFoundError(f"no allowlisted files ({', '.join(ALLOWED_PATTERNS)}) under {safe_uri}")
    key = listing_digest(selected, salt=_CACHE_KEY_VERSION)
    root = Path(local_cache_root).expanduser() if local_cache_root else default_download_dir()
    target = root / key
    if target.is_dir():
        problem = verify_local_dir(target, only_downloadable=True) if (target / COMPLETE_MARKER).is_file() else None
        if problem is None:
            logger.debug("materialize %s: cache hit %s", safe_uri, target)
            return target
        logger.warning("materialize %s: cached copy %s is corrupt (%s); downloading again", safe_uri, target, problem)
        discard_dir(target)
    return _download_into_cache(fs, path, str(uri), selected, target, retry)


def _download_into_cache(fs, path: str, uri: str, selected: dict[str, dict[str, Any]], target: Path,
                         retry: RetryPolicy | None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name[:16]}.tmp-", dir=target.parent))
    total = sum(int(info.get("size") or 0) for info in selected.values())
    logger.debug("materialize %s: downloading %d file(s), %d bytes", redact_uri(uri), len(selected), total)
    try:
        for rel in sorted(selected):
            local_file = staging / rel
            local_file.parent.mkdir(parents=True, exist_ok=True)
            remote_file = f"{strip_slash(path)}/{rel}"
            retry_call(lambda: fs.get_file(remote_file, str(local_file)), retry, join_uri(uri, rel), "download")
        _verify_against_marker(staging, uri)
        return _promote_cache_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verify_against_marker(local_dir: Path, uri: str) -> None:
    if not (local_dir / COMPLETE_MARKER).is_file():
        return
    problem = verify_local_dir(local_dir, only_downloadable=True)
    if problem is not None:
        raise IntegrityError(f"{redact_uri(uri)}: {problem}")


def _promote_cache_dir(staging: Path, target: Path) -> Path:
    try:
        os.replace(staging, target)
    except OSError:
        if target.is_dir():  # a concurrent download won the race; use its copy
            return target
        raise
    logger.debug("materialized into %s", target)
    return target
