"""Private temporary directories that a killed run does not leave behind for good.

A ``TemporaryDirectory`` is removed by its ``finally``; after ``kill -9`` nothing runs, and the
embedded Prefect server's home (``lorasuite-prefect-*``, 1-4 MB each), a publication's staging
copy or a stage's scratch directory would stay in ``$TMPDIR`` forever.  So every such directory
is named ``lorasuite-<kind>-<pid>-<random>`` (:func:`private_tempdir`), and each run first removes
:func:`stale` ones: ours by name, owned by this user, whose owning process is gone.  A directory
whose pid is alive (another run, or a reused pid) is left alone: removal errs on the safe side.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_NAME = re.compile(r"^lorasuite-[a-z0-9_]+-(\d+)-[A-Za-z0-9_]+$")


def make_private_tempdir(kind: str) -> Path:
    """``$TMPDIR/lorasuite-<kind>-<pid>-<random>`` (mode 0700); the caller removes it."""
    kind = re.sub(r"[^a-z0-9_]+", "_", kind.lower())
    return Path(tempfile.mkdtemp(prefix=f"lorasuite-{kind}-{os.getpid()}-"))


@contextlib.contextmanager
def private_tempdir(kind: str) -> Iterator[Path]:
    """A private temporary directory for the body, removed afterwards (and by :func:`clean_stale`
    after a kill)."""
    path = make_private_tempdir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process: alive
        return True
    return True


def stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Our temporary directories under ``root`` (default ``$TMPDIR``) whose owning process is gone."""
    root = Path(root or tempfile.gettempdir())
    found = []
    try:
        candidates = list(root.iterdir())
    except OSError:
        return []
    for path in candidates:
        match = _NAME.match(path.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid():
            continue
        if not _alive(int(match.group(1))):
            found.append(path)
    return found


def clean_stale(root: str | os.PathLike | None = None) -> int:
    """Remove :func:`stale` directories; returns how many were removed."""
    removed = 0
    for path in stale(root):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed += 1
    if removed:
        log.debug("removed %d temporary director%s left by killed runs", removed, "y" if removed == 1 else "ies")
    return removed
