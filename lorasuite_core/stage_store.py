"""Content-addressed store of pipeline stage outputs, on local disk or object storage (no Prefect).

Design
------
* **Identities, not tensors.** A model or adapter is identified by
  :func:`artifact_identity`: a hash of its file listing (names, sizes, ETags or
  inode+mtime — :func:`lorasuite_core.storage.dir_fingerprint`), never of its
  weights; a hub id is identified by its downloaded snapshot.  A data file by
  :func:`lorasuite_core.storage.file_fingerprint`; calibration text by the
  sha256 of its content (:func:`texts_identity`).
* **Keys.** :func:`stage_key` hashes the stage name, ``ALGORITHM_VERSION``,
  :data:`STORE_FORMAT` and the stage's inputs — identities, options and the keys
  of the stages it reads — as canonical JSON.  Changing any input, the
  algorithm version or the store layout gives a new key; nothing is invalidated
  in place.
* **Entries.** The output of stage ``s`` with key ``k`` is the directory
  ``<root>/<s>/<k>/``: array files (safetensors), other files, and ``_stage.json``
  (small JSON facts handed to later stages).  It is published with
  :func:`lorasuite_core.storage.publish_dir_atomic` (data first, completion
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
  manifest) is discarded with one warning line and recomputed.  Two writers
  racing on one key write the same content; the last atomic publication wins.
* **Root.** A local directory or any fsspec URI (``s3://bucket/prefix``):
  ``$LORASUITE_CACHE_ROOT``, else ``~/.cache/lorasuite/pipeline``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field

from . import ALGORITHM_VERSION, storage
from .samples import BUILTIN
from .errors import LorasuiteError
from .loading import HUB_ID, resolve_local_dir

log = logging.getLogger(__name__)

STORE_FORMAT = "lorasuite-stage-store/v1"
FACTS_FILE = "_stage.json"
ABSENT = "absent"
CACHE_ROOT_ENV = "LORASUITE_CACHE_ROOT"
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
ADAPTER_PATTERNS = ("*.json", "*.safetensors")


def default_store_root() -> str:
    """``$LORASUITE_CACHE_ROOT`` or ``~/.cache/lorasuite/pipeline``."""
    configured = os.environ.get(CACHE_ROOT_ENV)
    if configured:
        return configured if "://" in configured else str(Path(configured).expanduser())
    return str(Path.home() / ".cache" / "lorasuite" / "pipeline")


# --------------------------------------------------------------------------- identities


def _is_hub_id(ref: str) -> bool:
    return "://" not in ref and not Path(ref).expanduser().exists() and bool(HUB_ID.match(ref))


def artifact_identity(ref: str, what: str, patterns: Iterable[str] = MODEL_PATTERNS) -> str:
    """Identity of a model or adapter directory (path, fsspec URI or hub id) from its file listing."""
    text = str(ref)
    location = str(resolve_local_dir(text, what)) if _is_hub_id(text) else text
    try:
        return storage.dir_fingerprint(location, patterns)
    except (FileNotFoundError, NotADirectoryError):
        raise LorasuiteError(f"{what} {storage.redact_uri(text)} does not exist or holds no files") from None


def data_identity(ref: str | None, what: str = "data file") -> str:
    """Identity of a data file (its size and ETag/mtime); the spec itself for generated problems."""
    if ref is None:
        return "builtin"
    if ref.startswith(BUILTIN):
        return ref
    try:
        return storage.file_fingerprint(ref)
    except (FileNotFoundError, IsADirectoryError):
        raise LorasuiteError(f"{what} {storage.redact_uri(str(ref))} does not exist or is not a file") from None


def texts_identity(texts: list[str]) -> str:
    """sha256 of a list of texts (order matters)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def stage_key(stage: str, **parts: Any) -> str:
    """sha256 hex over the stage, the algorithm version, the store format and ``parts`` (canonical JSON)."""
    payload = {"stage": stage, "algorithm": ALGORITHM_VERSION, "format": STORE_FORMAT, "parts": parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


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

    @classmethod
    def at(cls, root: str | None) -> "StageStore":
        return cls(root or default_store_root())

    def location(self, stage: str, key: str) -> str:
        return storage.join_uri(self.root, stage, key)

    def is_complete(self, stage: str, key: str) -> bool:
        return self.problem(self.location(stage, key)) is None

    def facts(self, uri: str) -> dict[str, Any]:
        return json.loads((self.local_dir(uri) / FACTS_FILE).read_text())

    def problem(self, uri: str) -> str | None:
        """None for a complete, verified entry; :data:`ABSENT` when nothing is there; else what is wrong."""
        if not storage.is_remote(uri):
            path = Path(storage.resolve(uri)[1])
            if not path.exists():
                return ABSENT
            if not path.is_dir():
                return "not a directory"
            return storage.verify_local_dir(path)
        try:
            storage.materialize_dir(uri, require_complete=True)
        except FileNotFoundError:
            return ABSENT
        except (storage.IncompleteArtifactError, storage.IntegrityError) as error:
            return str(error)
        return None

    def local_dir(self, uri: str) -> Path:
        """A local directory holding the verified entry at ``uri`` (downloaded once when remote)."""
        problem = self.problem(uri)
        if problem is not None:
            what = "is missing" if problem == ABSENT else f"is corrupt or incomplete ({problem})"
            raise LorasuiteError(f"stage entry {storage.redact_uri(uri)} {what}; rerun the migration")
        if not storage.is_remote(uri):
            return Path(storage.resolve(uri)[1])
        return storage.materialize_dir(uri, require_complete=True)

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> StageResult:
        """Reuse the verified entry ``(stage, key)`` or compute it with ``compute(tmp_dir) -> facts``."""
        uri = self.location(stage, key)
        start = time.perf_counter()
        problem = self.problem(uri)
        if problem is None:
            facts = self.facts(uri)
            log.info("%s: reusing %s", stage, storage.redact_uri(uri))
            return StageResult(stage=stage, key=key, uri=uri, reused=True,
                               seconds=time.perf_counter() - start, facts=facts)
        if problem != ABSENT:
            log.warning("%s: discarding cache entry %s (%s); recomputing", stage, storage.redact_uri(uri), problem)
            storage.remove_dir(uri)
        with tempfile.TemporaryDirectory(prefix=f"lorasuite-{stage}-") as tmp:
            facts = compute(Path(tmp))
            (Path(tmp) / FACTS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
            storage.publish_dir_atomic(tmp, uri, overwrite=True)
        seconds = time.perf_counter() - start
        log.info("%s: computed and stored %s in %.2fs", stage, storage.redact_uri(uri), seconds)
        return StageResult(stage=stage, key=key, uri=uri, reused=False, seconds=seconds, facts=facts)
