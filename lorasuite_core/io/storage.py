"""Storage layer: one API for local disk and object storage (s3://, file://, any fsspec URI).

Design
------
* **Resolution.** :func:`resolve` maps a URI or path to ``(fs, path)`` through
  ``fsspec.core.url_to_fs``.  Plain paths (``~`` expanded) and ``file://`` go to
  the local filesystem; ``s3://`` / ``s3a://`` go to s3fs.  For S3 the endpoint
  comes from ``storage_options`` or else ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL``; credentials are left to botocore's standard chain
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles / roles) unless
  given as ``key`` / ``secret`` in ``storage_options``.  There is one retry layer:
  botocore makes one attempt per call (unless configured by the caller or
  ``AWS_MAX_ATTEMPTS``) and so does s3fs (its ``retries`` set to 1), so that :func:`with_retries`
  alone decides, waits and logs, and "after N attempts" counts the requests sent.
* **Retries.** Remote operations go through :func:`with_retries`: exponential
  backoff with jitter on transient errors (``OSError``, ``ConnectionError``,
  ``TimeoutError``, botocore connection / HTTP errors, aiohttp client errors),
  never on "answer" errors (not found, permission denied, exists), and a final
  :class:`StorageUnavailableError` naming the URI, the attempt count and the last
  error.  Local-disk operations are not retried.
* **Materialization.** :func:`materialize_dir` downloads a remote HF model or
  PEFT adapter directory once into a content-addressed cache (the key hashes
  the listing's names, sizes and ETags/mtimes, so a changed object gives a new
  key) and returns the local path; local paths are returned as they are.  Only
  safe, allowlisted kinds are fetched; pickle-based weights (``*.bin``, ``*.pt``,
  ``*.pth``, ``*.pkl``, ``*.ckpt``) are never downloaded, and a directory whose
  only weights are pickles is refused (:class:`UnsafeArtifactError`).  Downloads
  go to a temporary sibling that is renamed into place, so the cache never holds
  a partial directory; if the source carries a completion manifest, sizes and
  sha256 are verified (``require_complete=True`` also refuses a source without one).
* **Atomic publication.** :func:`publish_dir_atomic` makes a finished directory
  appear all at once.  Locally: copy into a temporary sibling directory, write
  the completion manifest in it last, ``os.replace`` it into place.  Remotely:
  upload everything under ``<dest>.tmp-<uuid>/`` (the destination is untouched
  while the slow part runs), copy the objects into place server-side, and write
  ``_LORASUITE_COMPLETE.json`` (file list with sizes and sha256) LAST.  Readers
  call :func:`is_complete`.  On failure the temporary prefix is deleted and the
  destination is left as it was.  Remotely, the first object written into the
  destination is ``_LORASUITE_PUBLISHING.json`` (removed after the completion
  manifest): a publication cut short by a crash or a dropped connection during
  the server-side copy leaves a destination that is recognisably *ours and
  partial* (:func:`output_state` ``"partial"``), which the next publication
  replaces without ``overwrite``.
* **Ownership.** :func:`output_state` tells ``empty`` / ``complete`` (our
  completion manifest, every listed file verified by size and sha256) /
  ``corrupt`` (our manifest, but invalid or no longer matching the files) /
  ``partial`` (our in-progress marker, no manifest) / ``foreign`` (anything
  else).  A publication replaces only what is ours: ``foreign`` content is
  refused even with ``overwrite``; ``complete`` needs ``overwrite``;
  ``partial`` and ``corrupt`` are replaced with one warning.
  :func:`check_output_location` refuses an output that is empty, the current
  directory (or one of its parents), the filesystem or bucket root, an input, a
  parent of an input or a directory inside one.  :func:`check_output` (both
  checks, directories) and :func:`check_output_file` (single JSON results,
  ours when they carry :data:`FILE_FORMAT_KEY`) are the one pre-run check of
  every subcommand.
* **Integrity.** A completion manifest vouches only for the files it lists: one
  listing none is invalid.  :func:`verify_local_dir` / :func:`verify_dir` check
  every listed file against its size *and sha256* (locally memoised per
  process on the files' size, mtime and inode, so repeated reads of one entry
  hash it once); downloads are verified the same way, and a cached download
  that no longer matches is discarded and fetched again.  Published files get
  the mode a plain ``open`` gives (``0666 & ~umask``), not ``mkstemp``'s 0600.
* **Fingerprints.** :func:`file_fingerprint` and :func:`dir_fingerprint` are cheap
  identities (sizes plus ETag or inode+mtime from ``fs.info`` / listings, no
  content read), usable as cache keys for "same model / same file".
* **No secrets in logs.** URIs are logged through :func:`redact_uri` (no
  user-info, no query string); error texts are scrubbed of query strings and
  access-key ids; ``storage_options`` are never logged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec

from lorasuite_core.errors import LorasuiteError

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMPLETE_MARKER = "_LORASUITE_COMPLETE.json"
PUBLISHING_MARKER = "_LORASUITE_PUBLISHING.json"
MARKER_FORMAT = "lorasuite.complete/v1"
ALLOWED_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md")
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors",)
_CACHE_KEY_VERSION = "lorasuite-materialize/v1"
_LOCAL_PROTOCOLS = ("file", "local")
_S3_PROTOCOLS = ("s3", "s3a")
_HASH_CHUNK = 8 * 1024 * 1024


# --------------------------------------------------------------------------- errors


class StorageError(LorasuiteError, RuntimeError):
    """Base class of this module's errors (user-facing: the CLI prints them as one line)."""


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


class UnsafeArtifactError(StorageError):
    """A directory only offers pickle-based weights, which are never loaded."""


class DestinationExistsError(StorageError):
    """The publication destination is not empty and overwrite was not requested."""


class IncompleteArtifactError(StorageError):
    """A directory required to be completely published has no completion manifest."""


class IntegrityError(StorageError):
    """Files do not match the completion manifest they were published with."""


class UnsafeOutputError(StorageError):
    """An output location that would overwrite an input, the working directory or foreign content."""


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


# --------------------------------------------------------------------------- redaction

_QUERY_IN_URL = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"?]*)\?[^\s'\"]*")
_USERINFO_IN_URL = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"@]+@")
_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b")


def redact_uri(uri: str) -> str:
    """``uri`` without user-info and query string (safe to log); plain paths unchanged."""
    uri = str(uri)
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return redact_text(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
_REGISTERED_SECRETS: set[str] = set()


def register_secrets_in(*uris: str | os.PathLike | None) -> None:
    """Remember the user-info (``key:secret@``) of URIs so it is scrubbed from every later message,
    even where a library prints the bare values (a traceback's locals, a repr of its arguments)."""
    for uri in uris:
        if not uri or "://" not in str(uri):
            continue
        netloc = urlsplit(str(uri)).netloc
        if "@" in netloc:
            for part in netloc.rsplit("@", 1)[0].split(":"):
                if len(part) >= 4:
                    _REGISTERED_SECRETS.add(unquote(part))
                    _REGISTERED_SECRETS.add(part)


def redact_text(text: str) -> str:
    """Scrub query strings, URL user-info, AWS access-key ids and every known secret value from free text."""
    text = _QUERY_IN_URL.sub(r"\1?<redacted>", str(text))
    text = _USERINFO_IN_URL.sub(r"\1***@", text)
    secrets = _REGISTERED_SECRETS | {v for v in (os.environ.get(n) for n in _SECRET_ENV) if v and len(v) >= 4}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return _ACCESS_KEY_ID.sub("<access-key-id>", text)


def describe_error(error: BaseException) -> str:
    """``TypeName: message`` with secrets scrubbed, on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {redact_text(message)}" if message else type(error).__name__


# --------------------------------------------------------------------------- retries


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


def _retry(fn: Callable[[], T], policy: RetryPolicy | None, uri: str, what: str) -> T:
    policy = policy or DEFAULT_RETRY_POLICY
    return with_retries(
        fn, attempts=policy.attempts, base_delay=policy.base_delay,
        max_delay=policy.max_delay, uri=uri, what=what,
    )


# --------------------------------------------------------------------------- resolution


def _as_uri(uri: str | os.PathLike) -> str:
    text = os.fspath(uri)
    return text if "://" in text else os.path.expanduser(text)


def _protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """Add the env endpoint and a capped botocore retry config unless already given."""
    options = dict(options)
    client_kwargs = options.get("client_kwargs") or {}
    if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    if "config_kwargs" not in options and "AWS_MAX_ATTEMPTS" not in os.environ:
        options["config_kwargs"] = {
            "connect_timeout": 10,
            "read_timeout": 120,
            "retries": {"total_max_attempts": 1, "mode": "standard"},   # one try: with_retries decides
        }
    return options


def resolve(uri: str | os.PathLike, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for a local path, ``file://`` or any fsspec URI (``s3://`` via s3fs)."""
    text = _as_uri(uri)
    if "://" in text and "@" in urlsplit(text).netloc:
        raise StorageError(f"{redact_uri(text)}: credentials inside a URI are not accepted (they end up in "
                           "shell histories and logs); use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile "
                           "or a role")
    options = dict(storage_options or {})
    if _protocol_of(text) in _S3_PROTOCOLS:
        options = _s3_options(options)
    fs, path = fsspec.core.url_to_fs(text, **options)
    if _protocol_of(text) in _S3_PROTOCOLS:
        fs.retries = 1          # s3fs's own retry loop (a class attribute, 5): one try, with_retries decides
    return fs, path


def is_local_fs(fs) -> bool:
    """True for fsspec's local filesystem."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in _LOCAL_PROTOCOLS for p in protocols)


def is_remote(uri: str | os.PathLike) -> bool:
    """True unless ``uri`` is a plain path or ``file://`` / ``local://`` URI."""
    return _protocol_of(_as_uri(uri)) not in _LOCAL_PROTOCOLS


def join_uri(base: str, *parts: str) -> str:
    """Join with ``/`` (URIs) or the OS separator (plain paths)."""
    if "://" in str(base):
        return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(str(base), *parts)


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


def _strip(path: str) -> str:
    return path.rstrip("/") or path


def _list_files(fs, path: str) -> dict[str, dict[str, Any]]:
    """``{relative_posix_path: info}`` for every file under ``path`` (empty if none)."""
    root = _strip(path)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    files: dict[str, dict[str, Any]] = {}
    for name, info in found.items():
        name = _strip(name)
        if info.get("type", "file") != "file":
            continue
        if name == root:
            raise NotADirectoryError(f"{root} is a file, expected a directory")
        if not name.startswith(root + "/"):
            continue
        files[name[len(root) + 1:]] = info
    return files


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    base = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, pattern) for pattern in patterns)


def _digest(entries: Iterable[Iterable[Any]], salt: str = "") -> str:
    hasher = hashlib.sha256(salt.encode())
    for entry in entries:
        hasher.update(json.dumps([str(part) for part in entry]).encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def _listing_entries(files: dict[str, dict[str, Any]]) -> list[tuple[str, int, str]]:
    return sorted((rel, int(info.get("size") or 0), _version_tag(info)) for rel, info in files.items())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, streamed."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


# --------------------------------------------------------------------------- small files


def read_bytes(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> bytes:
    """Whole-file bytes from a local path or URI."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        return Path(path).read_bytes()
    return _retry(lambda: fs.cat_file(path), retry, str(uri), "read")


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


def _follow_umask(path: Path) -> None:
    """Give a file we wrote the mode a plain ``open`` would (0666 & ~umask): ``mkstemp`` and safetensors
    create files 0600, and copies keep that."""
    os.chmod(path, 0o666 & ~_umask())


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _follow_umask(Path(tmp_name))
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
        _write_local_atomic(Path(path), data)
    else:
        _retry(lambda: fs.pipe_file(path, data), retry, str(uri), "write")
        fs.invalidate_cache(path)
    return str(uri)


def write_text_atomic(uri: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      storage_options=None, retry: RetryPolicy | None = None) -> str:
    """Text version of :func:`write_bytes_atomic`."""
    return write_bytes_atomic(uri, text.encode(encoding), storage_options=storage_options, retry=retry)


# --------------------------------------------------------------------------- fingerprints


def file_fingerprint(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str:
    """Cheap identity of one file: sha256 hex over (size, ETag or inode+mtime); no content read."""
    fs, path = resolve(uri, storage_options)
    if not is_local_fs(fs):
        fs.invalidate_cache(path)
    info = _retry(lambda: fs.info(path), retry, str(uri), "stat")
    if info.get("type") != "file":
        raise IsADirectoryError(f"{redact_uri(str(uri))} is not a file")
    return _digest([(int(info.get("size") or 0), _version_tag(info))], salt="file/v1")


def dir_fingerprint(uri: str | os.PathLike, patterns: Iterable[str] = ("*.json", "*.safetensors"), *,
                    storage_options=None, retry: RetryPolicy | None = None) -> str:
    """sha256 hex over sorted (relative name, size, ETag/mtime) of files matching ``patterns``.

    The completion manifest is excluded (republishing identical files is the same model
    on object stores).  FileNotFoundError if the directory holds no files at all.
    """
    fs, path = resolve(uri, storage_options)
    files = _retry(lambda: _list_files(fs, path), retry, str(uri), "list")
    if not files:
        raise FileNotFoundError(f"no files under {redact_uri(str(uri))}")
    patterns = tuple(patterns)
    selected = {rel: info for rel, info in files.items() if rel != COMPLETE_MARKER and _matches(rel, patterns)}
    return _digest(_listing_entries(selected), salt="dir/v1")


# --------------------------------------------------------------------------- materialize


def default_cache_root() -> Path:
    """``$LORASUITE_DOWNLOAD_DIR`` (old name ``$LORASUITE_CACHE_DIR``) or ``~/.cache/lorasuite/materialized``."""
    from lorasuite_core.settings import settings

    return settings().download_dir.expanduser()


def select_downloadable(uri: str, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Allowlisted files of a listing; UnsafeArtifactError if the only weights are pickles."""
    allowed = {rel: info for rel, info in files.items() if _matches(rel, ALLOWED_PATTERNS)
               and not _matches(rel, PICKLE_PATTERNS)}
    pickles = sorted(rel for rel in files if _matches(rel, PICKLE_PATTERNS))
    has_safetensors = any(_matches(rel, WEIGHT_PATTERNS) for rel in allowed)
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
    (use it for directories written by :func:`publish_dir_atomic`).
    """
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        local = Path(path)
        if not local.is_dir():
            raise FileNotFoundError(f"local directory not found: {local}")
        return local
    safe_uri = redact_uri(str(uri))
    files = _retry(lambda: _list_files(fs, path), retry, str(uri), "list")
    if not files:
        raise FileNotFoundError(f"no files under {safe_uri}")
    if require_complete and COMPLETE_MARKER not in files:
        raise IncompleteArtifactError(f"{safe_uri} has no {COMPLETE_MARKER}: not (yet) completely published")
    selected = select_downloadable(str(uri), files)
    if not selected:
        raise FileNotFoundError(f"no allowlisted files ({', '.join(ALLOWED_PATTERNS)}) under {safe_uri}")
    key = _digest(_listing_entries(selected), salt=_CACHE_KEY_VERSION)
    root = Path(local_cache_root).expanduser() if local_cache_root else default_cache_root()
    target = root / key
    if target.is_dir():
        problem = verify_local_dir(target, only_downloadable=True) if (target / COMPLETE_MARKER).is_file() else None
        if problem is None:
            logger.debug("materialize %s: cache hit %s", safe_uri, target)
            return target
        logger.warning("materialize %s: cached copy %s is corrupt (%s); downloading again", safe_uri, target, problem)
        _discard_dir(target)
    return _download_into_cache(fs, path, str(uri), selected, target, retry)


def _discard_dir(target: Path) -> None:
    """Move a directory aside (atomically, so no reader sees it half-deleted), then delete it."""
    retired = target.parent / f".{target.name}.discarded-{uuid.uuid4().hex}"
    try:
        os.replace(target, retired)
    except FileNotFoundError:
        return
    shutil.rmtree(retired, ignore_errors=True)


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
            remote_file = f"{_strip(path)}/{rel}"
            _retry(lambda: fs.get_file(remote_file, str(local_file)), retry, join_uri(uri, rel), "download")
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


_VERIFIED: dict[tuple[str, bool], tuple] = {}
_VERIFIED_LOCK = threading.Lock()


def _listed_path(entry: Any) -> str | None:
    """The relative path of a manifest entry, or None when it is malformed or escapes the directory."""
    rel = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        return None
    return rel


def verify_local_dir(directory: str | os.PathLike, *, only_downloadable: bool = False) -> str | None:
    """Why a local directory does not match its completion manifest, or None when it does.

    Every listed file must exist with the listed size and sha256 (``only_downloadable``: only
    the allowlisted kinds :func:`materialize_dir` fetches).  The sha256 pass is memoised per
    process on the files' (size, mtime, inode) and the manifest's, so an unchanged entry is
    hashed once; any in-place change of a file changes its mtime and forces a re-check.
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
        if only_downloadable and (not _matches(rel, ALLOWED_PATTERNS) or _matches(rel, PICKLE_PATTERNS)):
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


def _promote_cache_dir(staging: Path, target: Path) -> Path:
    try:
        os.replace(staging, target)
    except OSError:
        if target.is_dir():  # a concurrent download won the race; use its copy
            return target
        raise
    logger.debug("materialized into %s", target)
    return target


# --------------------------------------------------------------------------- completion


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
        data = read_json(join_uri(str(_as_uri(uri)), COMPLETE_MARKER),
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
    files = _retry(lambda: _list_files(fs, path), retry, str(uri), "list")
    for entry in marker["files"]:
        info = files.get(entry.get("path"))
        if info is None or int(info.get("size") or 0) != entry.get("size"):
            logger.debug("%s: %s missing or of unexpected size", redact_uri(str(uri)), entry.get("path"))
            return False
    return True


# --------------------------------------------------------------------------- publish


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


def output_state(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str:
    """``empty`` | ``complete`` | ``corrupt`` | ``partial`` | ``foreign``.

    ``complete``: our completion manifest, every file it lists present with its size and sha256
    (:func:`verify_dir`), so a rerun or a fleet may skip it as done.  ``corrupt``: our manifest
    (our format tag) that is invalid (lists no files) or that the files no longer match.
    ``partial``: our in-progress marker, no manifest.  A file, or a directory holding anything else,
    is ``foreign``.
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
            names = set(_retry(lambda: _list_files(fs, path), retry, str(uri), "list"))
        except NotADirectoryError:
            return "foreign"
        if not names:
            return "empty"
    if COMPLETE_MARKER in names:
        try:
            data = read_json(join_uri(str(_as_uri(uri)), COMPLETE_MARKER), storage_options=storage_options, retry=retry)
        except (ValueError, OSError):
            data = None
        if isinstance(data, dict) and data.get("format") == MARKER_FORMAT:
            problem = verify_dir(uri, storage_options=storage_options, retry=retry)
            if problem is None:
                return "complete"
            logger.info("output %s: %s", redact_uri(str(uri)), problem)
            return "corrupt"
    return "partial" if PUBLISHING_MARKER in names else "foreign"


def verify_dir(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> str | None:
    """Why a directory (local or remote) does not match its completion manifest, or None when every
    listed file is there with its size and sha256 (remote files are streamed through the hash)."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        return verify_local_dir(path)
    root = _strip(path)
    try:
        marker = json.loads(_retry(lambda: fs.cat_file(f"{root}/{COMPLETE_MARKER}"), retry, str(uri), "read"))
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER}"
    except ValueError as error:
        return f"unreadable {COMPLETE_MARKER} ({type(error).__name__})"
    problem = manifest_problem(marker)
    if problem is not None:
        return problem
    files = _retry(lambda: _list_files(fs, root), retry, str(uri), "list")
    for entry in marker["files"]:
        rel = entry["path"]
        info = files.get(rel)
        if info is None:
            return f"{rel} is listed in {COMPLETE_MARKER} but missing"
        if int(info.get("size") or 0) != entry["size"]:
            return f"{rel} has {info.get('size')} bytes, {COMPLETE_MARKER} lists {entry['size']}"

        def digest(rel=rel) -> str:
            hasher = hashlib.sha256()
            with fs.open(f"{root}/{rel}", "rb") as handle:
                for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                    hasher.update(chunk)
            return hasher.hexdigest()
        if _retry(digest, retry, join_uri(str(uri), rel), "verify") != entry["sha256"]:
            return f"{rel} does not match its sha256 in {COMPLETE_MARKER}"
    return None


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
                 storage_options=None) -> str:
    """The one pre-run check of every subcommand's output directory: a safe location
    (:func:`check_output_location`), then one that a publication may replace (:func:`check_replaceable`:
    empty, or our own publication, with ``overwrite`` when it is finished).  Returns its state."""
    check_output_location(output, inputs)
    state = output_state(output, storage_options=storage_options)
    check_replaceable(str(output), state, overwrite)
    return state


#: The key that marks a single JSON file as lorasuite's own output (e.g. ``lorasuite eval --output``).
FILE_FORMAT_KEY = "lorasuite_format"


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
    protocol = _protocol_of(text)
    if protocol in _LOCAL_PROTOCOLS:
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


def _copy_local_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    _follow_umask(target)


def _publish_local(source: Path, dest: Path, marker: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    try:
        for entry in marker["files"]:
            _copy_local_file(source / entry["path"], staging / entry["path"])
        _write_local_atomic(staging / COMPLETE_MARKER, _marker_bytes(marker))
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


def _publish_remote(fs, path: str, uri: str, source: Path, marker: dict[str, Any], state: str,
                    retry: RetryPolicy | None) -> None:
    dest = _strip(path)
    existing = _retry(lambda: _list_files(fs, dest), retry, uri, "list") if state != "empty" else {}
    staging = f"{dest}.tmp-{uuid.uuid4().hex}"
    promoted: list[str] = []
    claimed = False
    try:
        _stage_remote(fs, source, staging, uri, marker, retry)
        # Claim the destination first: from here on an interruption leaves it recognisably ours.
        claim = _marker_bytes({"format": MARKER_FORMAT, "publishing": staging.rsplit("/", 1)[-1],
                               "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        _retry(lambda: fs.pipe_file(f"{dest}/{PUBLISHING_MARKER}", claim), retry, uri, "claim destination")
        claimed = True
        if COMPLETE_MARKER in existing:
            _retry(lambda: fs.rm_file(f"{dest}/{COMPLETE_MARKER}"), retry, uri, "retract old manifest")
        _promote_remote(fs, staging, dest, uri, marker, retry, promoted)
        stale = set(existing) - {entry["path"] for entry in marker["files"]} - {COMPLETE_MARKER, PUBLISHING_MARKER}
        _remove_remote_files(fs, dest, sorted(stale), uri, retry)
        _write_marker(fs, dest, uri, marker, retry)
        _best_effort(lambda: _retry(lambda: fs.rm_file(f"{dest}/{PUBLISHING_MARKER}"), retry, uri, "release claim"),
                     uri, "remove the publishing marker")
    except BaseException:
        if state == "empty" and claimed:
            _best_effort(lambda: _remove_remote_files(fs, dest, [*promoted, PUBLISHING_MARKER], uri, retry),
                         uri, "undo promotion")
        raise
    finally:
        _best_effort(lambda: _retry(lambda: _remove_remote_prefix(fs, staging), retry, uri, "delete staging"),
                     uri, "delete staging prefix")
        fs.invalidate_cache(dest)


def _stage_remote(fs, source: Path, staging: str, uri: str, marker: dict[str, Any],
                  retry: RetryPolicy | None) -> None:
    for entry in marker["files"]:
        rel = entry["path"]
        local_file, remote_file = str(source / rel), f"{staging}/{rel}"
        _retry(lambda: fs.put_file(local_file, remote_file), retry, join_uri(uri, rel), "upload")


def _promote_remote(fs, staging: str, dest: str, uri: str, marker: dict[str, Any],
                    retry: RetryPolicy | None, promoted: list[str]) -> None:
    for entry in marker["files"]:
        rel = entry["path"]
        _retry(lambda: fs.cp_file(f"{staging}/{rel}", f"{dest}/{rel}"), retry, join_uri(uri, rel), "copy")
        promoted.append(rel)


def _write_marker(fs, dest: str, uri: str, marker: dict[str, Any], retry: RetryPolicy | None) -> None:
    """Write the completion manifest; the very last write of a publication."""
    data = _marker_bytes(marker)
    _retry(lambda: fs.pipe_file(f"{dest}/{COMPLETE_MARKER}", data), retry, uri, "write completion manifest")


def _remove_remote_files(fs, dest: str, relpaths: Iterable[str], uri: str, retry: RetryPolicy | None) -> None:
    paths = [f"{dest}/{rel}" for rel in relpaths]
    if paths:
        _retry(lambda: fs.rm(paths), retry, uri, "delete")


def _remove_remote_prefix(fs, prefix: str) -> None:
    fs.invalidate_cache(prefix)
    leftovers = list(fs.find(prefix))
    if leftovers:
        fs.rm(leftovers)
    fs.invalidate_cache(prefix)


def _best_effort(fn: Callable[[], Any], uri: str, what: str) -> None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - cleanup must not mask the original error
        logger.warning("%s for %s failed: %s", what, redact_uri(uri), describe_error(error))


def check_not_a_file(uri: str | os.PathLike, what: str, *, storage_options=None,
                     retry: RetryPolicy | None = None) -> None:
    """Raise UnsafeOutputError when ``uri`` names an existing file where a directory (prefix) belongs."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        is_file = Path(path).is_file()
    else:
        is_file = _retry(lambda: fs.isfile(_strip(path)), retry, str(uri), "inspect")
    if is_file:
        raise UnsafeOutputError(f"{what} {redact_uri(str(uri))} is a file, not a directory")


def remove_dir(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> None:
    """Delete a directory (a local one is first moved aside atomically); nothing there is fine."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        _discard_dir(Path(path))
        return
    _retry(lambda: _remove_remote_prefix(fs, _strip(path)), retry, str(uri), "delete")


def dir_is_empty(uri: str | os.PathLike, *, storage_options=None, retry: RetryPolicy | None = None) -> bool:
    """True when nothing exists at ``uri`` or it is a directory without entries (a file is not empty)."""
    fs, path = resolve(uri, storage_options)
    if is_local_fs(fs):
        local = Path(path)
        return not local.is_file() and (not local.exists() or not any(local.iterdir()))
    try:
        return not _retry(lambda: _list_files(fs, path), retry, str(uri), "list")
    except NotADirectoryError:
        return False
