"""Content-addressed store of pipeline stage outputs, on local disk or object storage (no Prefect).

Design
------
* **Identities, not tensors.** A model or adapter is identified by
  :func:`artifact_identity`: a hash of its file listing (names, sizes, ETags or
  inode+mtime — :func:`lorasuite_core.io.fingerprints.dir_fingerprint`), never of its
  weights; a hub id is identified by its downloaded snapshot.  A data file by
  :func:`lorasuite_core.io.fingerprints.file_fingerprint`; calibration text by the
  sha256 of its content (:func:`texts_identity`).
* **Keys.** :func:`stage_key` hashes the stage name, ``ALGORITHM_VERSION``,
  :data:`STORE_FORMAT` and the stage's inputs — identities, options and the keys
  of the stages it reads — as canonical JSON.  Changing any input, the
  algorithm version or the store layout gives a new key; nothing is invalidated
  in place.
* **Entries.** The output of stage ``s`` with key ``k`` is the directory
  ``<root>/<s>/<k>/``: array files (safetensors), other files, and ``_stage.json``
  (small JSON facts handed to later stages).  It is published with
  :func:`lorasuite_core.io.publish.publish_dir_atomic` (data first, completion
  manifest with every file's size and sha256 last), so a writer that dies
  half-way leaves nothing a reader would use.
* **Integrity.** An entry counts only when every file matches its size and
  sha256 in the manifest (:meth:`StageStore.problem`; local entries are hashed
  in place, memoised per process; remote ones are verified as they are
  downloaded).  Entries hold safetensors and JSON only: nothing is unpickled.
* **Reuse.** :meth:`StageStore.run` returns the facts of a verified entry
  (``reused=True``) or computes the entry into a temporary local directory,
  publishes it and returns its facts (``reused=False``).  An entry that exists
  but is corrupt or incomplete (sha256 mismatch, unreadable header, missing
  manifest) is discarded with one warning line and recomputed.
* **Progress.** :meth:`StageStore.run` is where every stage reports to the terminal
  (:mod:`lorasuite_core.io.terminal`): started when it computes, finished (computed or reused, with
  its seconds) — the one place both the in-process path and the Prefect tasks go through.  The
  entry's location (content hash included) is a DEBUG line: the log file and ``-v`` only.
* **One computation per entry.** "check -> compute -> publish" runs under a
  per-(stage, key) lock, and the entry is checked again once the lock is held,
  so concurrent runs on one root compute each stage once: the first computes,
  the others log one INFO line (``waiting for another run computing <stage>``),
  wait, then reuse its entry.

  - Local root: a ``filelock.FileLock`` on ``<root>/.locks/<stage>-<key>.lock``
    (outside the entry directory, which is replaced on publication).  It is an
    OS lock (``flock``), released by the kernel when the holder exits or
    crashes, so a waiter never waits for a dead process.
  - Object-store root: a lease object ``<root>/.leases/<stage>/<key>.json``
    ``{owner, host, pid, stage, key, renewed_at, expires_at, ttl_s}``.  Acquire
    = create it only if absent (S3 ``PutObject`` with ``If-None-Match: *``); a
    lease whose ``expires_at`` has passed belongs to a holder that stopped
    renewing (crashed) and is taken over by replacing exactly the object that
    was read (``If-Match: <ETag>``), so of several waiters exactly one wins.
    The holder renews it every ``ttl/3`` from a background thread while
    computing (``If-Match`` on its own last ETag; a lost lease is logged) and
    deletes it after publishing.  Waiters poll every ``lease_poll_s`` until the
    lease is released or expires, then take it and re-check the entry.  Expiry
    compares wall clocks of different hosts: keep ``lease_ttl_s`` (120 s) far
    above their skew.  Filesystems other than S3 get a best-effort lease
    (create if absent, then read back and compare the owner).
  - ``lock_timeout_s`` (default None: wait while the holder is alive) bounds a
    wait; past it the run fails with a LorasuiteError naming the lock.

  Locally the lock is never held twice (without it, two concurrent local
  publications of one entry could collide in the directory swap).  On an
  object store the lease is best effort: were two runs ever to hold it (an
  expired lease whose holder was in fact alive, or a store that ignores
  conditional writes), both compute the same content and publish it with
  :func:`lorasuite_core.io.publish.publish_dir_atomic`.
* **Root.** A local directory or any fsspec URI (``s3://bucket/prefix``):
  ``$LORASUITE_CACHE_ROOT``, else ``~/.cache/lorasuite/pipeline``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import filelock
from pydantic import BaseModel, ConfigDict, Field

from lorasuite_core import ALGORITHM_VERSION
from lorasuite_core.io import terminal
from lorasuite_core.io.completion import verify_local_dir
from lorasuite_core.io.files import remove_dir
from lorasuite_core.io.fingerprints import dir_fingerprint, file_fingerprint
from lorasuite_core.io.materialize import IncompleteArtifactError, IntegrityError, materialize_dir
from lorasuite_core.io.memory import release_if_grown, resident_bytes
from lorasuite_core.io.publish import publish_dir_atomic
from lorasuite_core.io.uris import describe_error, is_remote, join_uri, redact_uri, resolve
from lorasuite_core.io.tempdirs import private_tempdir
from lorasuite_core.training.samples import BUILTIN
from lorasuite_core.training.skills import TASK, data_identity as task_identity
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import HUB_ID, resolve_local_dir

log = logging.getLogger(__name__)

STORE_FORMAT = "lorasuite-stage-store/v1"
FACTS_FILE = "_stage.json"
ABSENT = "absent"
CACHE_ROOT_ENV = "LORASUITE_CACHE_ROOT"   # read through lorasuite_core.settings
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
ADAPTER_PATTERNS = ("*.json", "*.safetensors")
LOCKS_DIR = ".locks"
LEASES_DIR = ".leases"
LEASE_TTL_S = 120.0
LEASE_POLL_S = 2.0


def configured_cache_root() -> str:
    """``$LORASUITE_CACHE_ROOT`` or ``~/.cache/lorasuite/pipeline`` (:mod:`lorasuite_core.settings`)."""
    from lorasuite_core.settings import settings

    return settings().cache_root_uri()


# --------------------------------------------------------------------------- identities


def _is_hub_id(ref: str) -> bool:
    return "://" not in ref and not Path(ref).expanduser().exists() and bool(HUB_ID.match(ref))


def artifact_identity(ref: str, what: str, patterns: Iterable[str] = MODEL_PATTERNS) -> str:
    """Identity of a model or adapter directory (path, fsspec URI or hub id) from its file listing."""
    text = str(ref)
    location = str(resolve_local_dir(text, what)) if _is_hub_id(text) else text
    try:
        return dir_fingerprint(location, patterns)
    except (FileNotFoundError, NotADirectoryError):
        raise LorasuiteError(f"{what} {redact_uri(text)} does not exist or holds no files") from None


def data_identity(ref: str | None, what: str = "data file") -> str:
    """Identity of a data file (its size and ETag/mtime); the spec itself for generated problems, with the
    skill's data version for a task: spec."""
    if ref is None:
        return "builtin"
    if ref.startswith(BUILTIN):
        return ref
    if ref.startswith(TASK):
        try:
            return task_identity(ref)
        except ValueError as exc:
            raise LorasuiteError(str(exc)) from None
    try:
        return file_fingerprint(ref)
    except (FileNotFoundError, IsADirectoryError):
        raise LorasuiteError(f"{what} {redact_uri(str(ref))} does not exist or is not a file") from None


def texts_identity(texts: list[str]) -> str:
    """sha256 of a list of texts (order matters)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def stage_key(stage: str, **parts: Any) -> str:
    """sha256 hex over the stage, the algorithm version, the store format and ``parts`` (canonical JSON)."""
    payload = {"stage": stage, "algorithm": ALGORITHM_VERSION, "format": STORE_FORMAT, "parts": parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- locks


class _LeaseConflict(Exception):
    """A conditional write lost: the lease object is not what we expected."""


def _is_precondition_failure(error: BaseException) -> bool:
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    return isinstance(error, FileExistsError) or response.get("Error", {}).get("Code") == "PreconditionFailed"


def _is_s3(fs) -> bool:
    try:
        import s3fs
    except ImportError:  # pragma: no cover - s3 support not installed
        return False
    return isinstance(fs, s3fs.S3FileSystem)


async def _s3_get(fs, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        return await body.read(), response["ETag"]


@dataclass
class _Lease:
    """Lease object ``path`` on an object store (see the module docstring); one per acquisition attempt."""

    fs: Any
    path: str
    uri: str
    stage: str
    key: str
    ttl_s: float
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str | None = None          # identity of our last write (S3 ETag, else sha256 of the body)
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None

    # ---- storage primitives: conditional on S3, best effort elsewhere

    def _document(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "stage": self.stage, "key": self.key, "renewed_at": now,
                           "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s}, sort_keys=True).encode()

    def _get(self) -> tuple[bytes, str] | None:
        try:
            if _is_s3(self.fs):
                from fsspec.asyn import sync

                bucket, key, _ = self.fs.split_path(self.path)
                return sync(self.fs.loop, _s3_get, self.fs, bucket, key)
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _put(self, body: bytes, *, expect: str | None) -> str:
        """Write ``body`` if the object is absent (``expect`` None) or still is ``expect``; else _LeaseConflict."""
        if _is_s3(self.fs):
            bucket, key, _ = self.fs.split_path(self.path)
            condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
            try:
                response = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
            except OSError as error:
                if _is_precondition_failure(error):
                    raise _LeaseConflict from None
                raise
            self.fs.invalidate_cache(self.path)
            return response["ETag"]
        current = self._get()
        if (current is not None) if expect is None else (current is None or current[1] != expect):
            raise _LeaseConflict
        self.fs.pipe_file(self.path, body)
        self.fs.invalidate_cache(self.path)
        time.sleep(0.2)  # best effort: let a racing writer land, then see who holds it
        written = self._get()
        if written is None or _holder(written[0]).get("owner") != self.owner:
            raise _LeaseConflict
        return written[1]

    # ---- lease protocol

    def try_acquire(self) -> tuple[bool, dict[str, Any]]:
        """``(True, {})`` when we now hold the lease, else ``(False, <holder's lease document>)``."""
        try:
            self.etag = self._put(self._document(), expect=None)
            return True, {}
        except _LeaseConflict:
            pass
        current = self._get()
        if current is None:                # released in between: try again at the next poll
            return False, {}
        holder = _holder(current[0])
        if float(holder.get("expires_at", 0)) > time.time():
            return False, holder
        try:
            self.etag = self._put(self._document(), expect=current[1])
        except _LeaseConflict:             # another waiter took it over first
            return False, holder
        log.warning("%s: took over the expired lease %s of %s (pid %s, expired %.0fs ago)", self.stage,
                    redact_uri(self.uri), holder.get("host", "?"), holder.get("pid", "?"),
                    time.time() - float(holder.get("expires_at", 0)))
        return True, {}

    def renew(self) -> bool:
        try:
            self.etag = self._put(self._document(), expect=self.etag)
            return True
        except _LeaseConflict:
            log.warning("%s: lost the lease %s to another run (renewal came too late); finishing anyway",
                        self.stage, redact_uri(self.uri))
            return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as error:  # noqa: BLE001 - keep trying until the lease expires
                log.warning("%s: could not renew the lease %s: %s", self.stage, redact_uri(self.uri),
                            describe_error(error))

    def start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-{self.stage}", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = self._get()
            if current is not None and current[1] == self.etag:
                self.fs.rm_file(self.path)
                self.fs.invalidate_cache(self.path)
        except Exception as error:  # noqa: BLE001 - an unreleased lease only expires
            log.warning("%s: could not release the lease %s (it expires in %.0fs): %s", self.stage,
                        redact_uri(self.uri), self.ttl_s, describe_error(error))


def _holder(data: bytes) -> dict[str, Any]:
    """The lease document; ``{}`` (an expired lease) when it is not one."""
    try:
        document = json.loads(data)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}



# --------------------------------------------------------------------------- entries


class StageResult(BaseModel):
    """What a stage hands on: where its entry lives and its small facts (never arrays)."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    uri: str
    reused: bool
    seconds: float
    facts: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class StageStore:
    """Entries ``<root>/<stage>/<key>/`` published atomically; see the module docstring."""

    root: str
    lease_ttl_s: float = LEASE_TTL_S
    lease_poll_s: float = LEASE_POLL_S
    lock_timeout_s: float | None = None

    @classmethod
    def at(cls, root: str | None) -> "StageStore":
        return cls(root or configured_cache_root())

    def location(self, stage: str, key: str) -> str:
        return join_uri(self.root, stage, key)

    def is_complete(self, stage: str, key: str) -> bool:
        return self.problem(self.location(stage, key)) is None

    def facts(self, uri: str) -> dict[str, Any]:
        return json.loads((self.local_dir(uri) / FACTS_FILE).read_text())

    def problem(self, uri: str) -> str | None:
        """None for a complete, verified entry; :data:`ABSENT` when nothing is there; else what is wrong."""
        if not is_remote(uri):
            path = Path(resolve(uri)[1])
            if not path.exists():
                return ABSENT
            if not path.is_dir():
                return "not a directory"
            return verify_local_dir(path)
        try:
            materialize_dir(uri, require_complete=True)
        except FileNotFoundError:
            return ABSENT
        except (IncompleteArtifactError, IntegrityError) as error:
            return str(error)
        return None

    def local_dir(self, uri: str) -> Path:
        """A local directory holding the verified entry at ``uri`` (downloaded once when remote)."""
        problem = self.problem(uri)
        if problem is not None:
            what = "is missing" if problem == ABSENT else f"is corrupt or incomplete ({problem})"
            raise LorasuiteError(f"stage entry {redact_uri(uri)} {what}; rerun the migration")
        if not is_remote(uri):
            return Path(resolve(uri)[1])
        return materialize_dir(uri, require_complete=True)

    def lock_location(self, stage: str, key: str) -> str:
        """The lock file (local root) or lease object (object store) guarding entry ``(stage, key)``."""
        if is_remote(self.root):
            return join_uri(self.root, LEASES_DIR, stage, f"{key}.json")
        return str(Path(resolve(self.root)[1]) / LOCKS_DIR / f"{stage}-{key}.lock")

    def _waited_too_long(self, stage: str, where: str, waited: float) -> LorasuiteError:
        return LorasuiteError(f"gave up after {waited:.0f}s waiting for another run computing {stage} "
                              f"(lock {redact_uri(where)}); raise the lock timeout or remove a stuck lock")

    @contextmanager
    def exclusive(self, stage: str, key: str) -> Iterator[None]:
        """Hold the per-(stage, key) lock; waits (one INFO line) while another run holds it."""
        where = self.lock_location(stage, key)
        if not is_remote(self.root):
            Path(where).parent.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(where)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                log.info("waiting for another run computing %s", stage)
                log.debug("%s: lock %s", stage, where)
                started = time.monotonic()
                try:
                    lock.acquire(timeout=-1 if self.lock_timeout_s is None else self.lock_timeout_s)
                except filelock.Timeout:
                    raise self._waited_too_long(stage, where, time.monotonic() - started) from None
            try:
                yield
            finally:
                lock.release()
            return
        fs, path = resolve(where)
        lease = _Lease(fs, path, where, stage, key, self.lease_ttl_s)
        started, announced = time.monotonic(), False
        while True:
            acquired, holder = lease.try_acquire()
            if acquired:
                break
            if not announced:
                log.info("waiting for another run computing %s (held by %s pid %s)", stage,
                         holder.get("host", "?"), holder.get("pid", "?"))
                log.debug("%s: lease %s", stage, redact_uri(where))
                announced = True
            waited = time.monotonic() - started
            if self.lock_timeout_s is not None and waited > self.lock_timeout_s:
                raise self._waited_too_long(stage, where, waited)
            time.sleep(self.lease_poll_s)
        lease.start_renewing()
        try:
            yield
        finally:
            lease.release()

    def _reused(self, stage: str, key: str, uri: str, start: float) -> StageResult:
        facts = self.facts(uri)
        seconds = time.perf_counter() - start
        log.debug("%s: reusing %s", stage, redact_uri(uri))
        terminal.finished(stage, seconds, reused=True)
        return StageResult(stage=stage, key=key, uri=uri, reused=True, seconds=seconds, facts=facts)

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]], *,
            prior_seconds: float = 0.0) -> StageResult:
        """Reuse the verified entry ``(stage, key)`` or compute it with ``compute(tmp_dir) -> facts``.

        Computing happens under :meth:`exclusive`; the entry is checked again once the lock is held.
        ``prior_seconds``: time this entry's computation spent before the call (its share of a batched stage's
        shared work), added to the computed entry's seconds.
        """
        uri = self.location(stage, key)
        start = time.perf_counter()
        if self.problem(uri) is None:
            return self._reused(stage, key, uri, start)
        with self.exclusive(stage, key):
            problem = self.problem(uri)
            if problem is None:                      # another run published it while we waited
                return self._reused(stage, key, uri, start)
            if problem != ABSENT:
                log.warning("%s: discarding cache entry %s (%s); recomputing", stage, redact_uri(uri),
                            problem)
                remove_dir(uri)
            resident = resident_bytes()
            with terminal.computing(stage), private_tempdir(stage) as tmp:
                facts = compute(Path(tmp))
                (Path(tmp) / FACTS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
                publish_dir_atomic(tmp, uri, overwrite=True)
        release_if_grown(resident)                   # the stage's models are garbage now (io.memory)
        seconds = time.perf_counter() - start + prior_seconds
        log.debug("%s: computed and stored %s in %.2fs", stage, redact_uri(uri), seconds)
        terminal.finished(stage, seconds, reused=False)
        return StageResult(stage=stage, key=key, uri=uri, reused=False, seconds=seconds, facts=facts)
