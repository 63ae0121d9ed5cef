"""File I/O on local disk and object storage: listings, hashes, small files, atomic writes, directories.

Design
------
* Every function takes a local path or any URI (:func:`lorasuite_core.io.uris.resolve`); remote
  calls go through the one retry layer (:func:`lorasuite_core.io.retry.retry_call`), local-disk
  calls are not retried.
* **Listings.** :func:`list_files` gives ``{relative path: fsspec info}`` of every file under a
  directory or prefix; :func:`listing_digest` hashes such a listing's (name, size, ETag or
  inode+mtime), no content read: the identity behind fingerprints and the download cache key.
* **Small files.** :func:`read_bytes` / :func:`read_text` / :func:`read_json` read a whole file;
  :func:`write_bytes_atomic` / :func:`write_text_atomic` write so that readers see the old or
  the new content, never a mix (locally: temp file + fsync + ``os.replace``; object stores: one
  PUT).  Files we write get the mode a plain ``open`` gives (``0666 & ~umask``), not
  ``mkstemp``'s 0600 (:func:`follow_umask`).
* **File kinds.** Only safe, allowlisted kinds (:data:`ALLOWED_PATTERNS`) are ever downloaded;
  pickle-based weights (:data:`PICKLE_PATTERNS`) never are (:func:`is_downloadable`).
* **Directories.** :func:`remove_dir` deletes a directory (a local one is first moved aside
  atomically, :func:`discard_dir`); :func:`dir_is_empty` tells an absent or empty one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from lorasuite_core.io.retry import RetryPolicy, retry_call
from lorasuite_core.io.uris import is_local_fs, redact_uri, resolve

ALLOWED_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md")
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors",)
_HASH_CHUNK = 8 * 1024 * 1024


# --------------------------------------------------------------------------- listings


def _version_tag(info: dict[str, Any]) -> str:
    """ETag-like identity from an fsspec info dict (ETag, md5, or inode+mtime)."""
    for key in ("ETag", "etag", "md5Hash", "md5"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    if info.get("mtime") is not None:
        return f"ino:{info.get('ino', '')}:mtime:{info['mtime']}"
    for key in ("LastModified", "last_modified", "updated", "modified", "created"):
        if info.get(key) is not None:
            return f"time:{info[key]}"
    return "unversioned"


def strip_slash(path: str) -> str:
    """``path`` without trailing slashes (a bare ``/`` stays)."""
    return path.rstrip("/") or path


def list_files(fs, path: str) -> dict[str, dict[str, Any]]:
    """``{relative_posix_path: info}`` for every file under ``path`` (empty if none)."""
    root = strip_slash(path)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    files: dict[str, dict[str, Any]] = {}
    for name, info in found.items():
        name = strip_slash(name)
        if info.get("type", "file") != "file":
            continue
        if name == root:
            raise NotADirectoryError(f"{root} is a file, expected a directory")
        if not name.startswith(root + "/"):
            continue
        files[name[len(root) + 1:]] = info
    return files


def matches(relpath: str, patterns: Iterable[str]) -> bool:
    """True when the file name of ``relpath`` matches one of the glob ``patterns``."""
    base = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, pattern) for pattern in patterns)


def is_downloadable(relpath: str) -> bool:
    """An allowlisted kind (:data:`ALLOWED_PATTERNS`) and no pickle."""
    return matches(relpath, ALLOWED_PATTERNS) and not matches(relpath, PICKLE_PATTERNS)


def _digest(entries: Iterable[Iterable[Any]], salt: str = "") -> str:
    hasher = hashlib.sha256(salt.encode())
    for entry in entries:
        hasher.update(json.dumps([str(part) for part in entry]).encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def info_digest(info: dict[str, Any], salt: str) -> str:
    """sha256 hex over one file's (size, ETag or inode+mtime)."""
    return _digest([(int(info.get("size") or 0), _version_tag(info))], salt=salt)


def listing_digest(files: dict[str, dict[str, Any]], salt: str) -> str:
    """sha256 hex over a listing's sorted (relative name, size, ETag or inode+mtime)."""
    return _digest(sorted((rel, int(info.get("size") or 0), _version_tag(info)) for rel, info in files.items()),
                   salt=salt)


def sha256_stream(handle: BinaryIO) -> str:
    """Hex sha256 of an open binary file, read in chunks."""
    hasher = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
        hasher.update(chunk)
    return hasher.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, streamed."""
    with open(path, "rb") as handle:
        return sha256_stream(handle)


# --------------------------------------------------------------------------- small files


def read_bytes(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> bytes:
    """Whole-file bytes from a local path or URI."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        return Path(path).read_bytes()
    return retry_call(lambda: fs.cat_file(path), retry, str(uri), "read")


def read_text(uri: str | os.PathLike, *, encoding: str = "utf-8", storage_options=None,
              retry: RetryPolicy | None = None) -> str:
    """Whole-file text from a local path or URI."""
    return read_bytes(uri, storage_options=storage_options, retry=retry).decode(encoding)


def read_json(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> Any:
    """Parsed JSON from a local path or URI (ValueError naming the URI if invalid)."""
    text = read_text(uri, storage_options=storage_options, retry=retry)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{redact_uri(str(uri))}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)   # pragma: no cover - not Linux
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give a file we wrote the mode a plain ``open`` would (0666 & ~umask): ``mkstemp`` and safetensors
    create files 0600, and copies keep that."""
    os.chmod(path, 0o666 & ~_umask())


def write_local_atomic(path: Path, data: bytes) -> None:
    """Write a local file through a temp sibling, fsync and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_bytes_atomic(uri: str | os.PathLike, data: bytes, *, storage_options=None,
                       retry: RetryPolicy | None = None) -> str:
    """Write so readers see the old or the new content, never a mix; returns ``uri``.

    Local: temp file in the same directory + fsync + ``os.replace``.  Object stores:
    a single PUT, which is atomic per object.
    """
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        write_local_atomic(Path(path), data)
    else:
        retry_call(lambda: fs.pipe_file(path, data), retry, str(uri), "write")
        fs.invalidate_cache(path)
    return str(uri)


def write_text_atomic(uri: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      storage_options=None, retry: RetryPolicy | None = None) -> str:
    """Text version of :func:`write_bytes_atomic`."""
    return write_bytes_atomic(uri, text.encode(encoding), storage_options=storage_options, retry=retry)


# --------------------------------------------------------------------------- directories


def discard_dir(target: Path) -> None:
    """Move a directory aside (atomically, so no reader sees it half-deleted), then delete it."""
    retired = target.parent / f".{target.name}.discarded-{uuid.uuid4().hex}"
    try:
        os.replace(target, retired)
    except FileNotFoundError:
        return
    shutil.rmtree(retired, ignore_errors=True)


def remove_remote_prefix(fs, prefix: str) -> None:
    """Delete every object under ``prefix`` (not retried: callers wrap it)."""
    fs.invalidate_cache(prefix)
    leftovers = list(fs.find(prefix))
    if leftovers:
        fs.rm(leftovers)
    fs.invalidate_cache(prefix)


def remove_dir(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> None:
    """Delete a directory (a local one is first moved aside atomically); nothing there is fine."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        discard_dir(Path(path))
        return
    retry_call(lambda: remove_remote_prefix(fs, strip_slash(path)), retry, str(uri), "delete")


def dir_is_empty(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> bool:
    """True when nothing exists at ``uri`` or it is a directory without entries (a file is not empty)."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        local = Path(path)
        return not local.is_file() and (not local.exists() or not any(local.iterdir()))
    try:
        return not retry_call(lambda: list_files(fs, path), retry, str(uri), "list")
    except NotADirectoryError:
        return False
