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
  manifest last) and counts only once complete (:func:`storage.is_complete`), so
  a writer that dies half-way leaves nothing a reader would use.
* **Reuse.** :meth:`StageStore.run` returns the facts of a complete entry
  (``reused=True``) or computes the entry into a temporary local directory,
  publishes it and returns its facts (``reused=False``).  Two writers racing on
  one key write the same content; the last atomic publication wins.
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
        return storage.is_complete(self.location(stage, key))

    def facts(self, uri: str) -> dict[str, Any]:
        return storage.read_json(storage.join_uri(uri, FACTS_FILE))

    def local_dir(self, uri: str) -> Path:
        """A local directory holding the complete entry at ``uri`` (downloaded once when remote)."""
        if not storage.is_remote(uri):
            path = Path(storage.resolve(uri)[1])
            if not storage.is_complete(path):
                raise LorasuiteError(f"stage entry {uri} is missing or incomplete; rerun the migration")
            return path
        try:
            return storage.materialize_dir(uri, require_complete=True)
        except FileNotFoundError:
            raise LorasuiteError(f"stage entry {storage.redact_uri(uri)} is missing; rerun the migration") from None

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> StageResult:
        """Reuse the complete entry ``(stage, key)`` or compute it with ``compute(tmp_dir) -> facts``."""
        uri = self.location(stage, key)
        start = time.perf_counter()
        if storage.is_complete(uri):
            facts = self.facts(uri)
            log.info("%s: reusing %s", stage, storage.redact_uri(uri))
            return StageResult(stage=stage, key=key, uri=uri, reused=True,
                               seconds=time.perf_counter() - start, facts=facts)
        with tempfile.TemporaryDirectory(prefix=f"lorasuite-{stage}-") as tmp:
            facts = compute(Path(tmp))
            (Path(tmp) / FACTS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
            storage.publish_dir_atomic(tmp, uri, overwrite=True)
        seconds = time.perf_counter() - start
        log.info("%s: computed and stored %s in %.2fs", stage, storage.redact_uri(uri), seconds)
        return StageResult(stage=stage, key=key, uri=uri, reused=False, seconds=seconds, facts=facts)
