"""Fleet manifest schema: which adapters to migrate, from which base model to which.

Design
------
A *fleet manifest* is a small YAML or JSON document (local path or any fsspec URI,
read through :mod:`lorasuite_core.io.files`) describing one base-model upgrade and
the adapters to carry across it::

    old_model: s3://bucket/models/old      # local path, fsspec URI or hub id
    new_model: s3://bucket/models/new
    output_root: s3://bucket/migrated/     # each adapter goes to output_root/<name>
    defaults: {lft: true, lft_samples: 100, lft_lr: 9e-4, lft_epochs: 1, head_transform: lstsq}
    analysis: {calibration_data: s3://bucket/data/calib.txt, max_calibration_tokens: 2048}  # optional
    adapters:
      - name: support-bot
        adapter: s3://bucket/adapters/support-bot
        lft_data: s3://bucket/data/support.jsonl       # optional; absent => transfer only
        eval_data: s3://bucket/data/support-test.jsonl # optional
        overrides: {lft_samples: 200}                  # optional

Rules
  * Every model forbids unknown fields, so a typo (``lft_sample``) is an error, not a
    silently ignored option.
  * Validation failures are raised as :class:`ManifestError`, one line, naming the
    field path of every problem (``adapters[2].name: ...``), built from pydantic's
    ``ValidationError``.
  * Adapter names are unique and match ``[A-Za-z0-9._-]+`` so that they are safe
    as a path component of ``output_root/<name>`` on any backend (and ``.``/``..``
    are refused).
  * Model / adapter / data references are kept verbatim (no relative-path
    resolution): a hub id such as ``Qwen/Qwen2.5-0.5B`` is indistinguishable from a
    relative path, so interpretation is left to the caller.
  * YAML is parsed with PyYAML's ``safe_load`` when PyYAML is importable (it ships
    with Prefect); otherwise only JSON manifests are accepted.  Note that YAML 1.1
    reads ``9e-4`` as a string; numeric fields are validated in pydantic's lax mode,
    which turns such strings into floats.

:class:`BaseModelRelease` is the payload of an "a new base model was released"
event; matching fleet entries against it is the flow's job.

:class:`AnalysisOptions` (the optional ``analysis`` section) configures the pair analysis that
every adapter of the fleet shares: calibration text, its token budget, the layer offset.
``vanilla_baseline`` (train a fresh LoRA on the new model with the entry's LFT data, for the
evaluation table) and ``eval_samples`` (evaluate on the first N rows only) are per-entry knobs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import DISTILL_ROUTES, AnalysisOptions, MigrationOptions, OptionOverrides, validate

try:  # PyYAML comes with Prefect; JSON-only without it.
    import yaml as _yaml
except ImportError:  # pragma: no cover - depends on the environment
    _yaml = None

logger = logging.getLogger(__name__)

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
_DUPLICATE_NAME_ERROR = "duplicate_adapter_name"
_SAME_MODEL_ERROR = "same_base_model"


class ManifestError(LorasuiteError, ValueError):
    """An invalid or unreadable fleet manifest; ``errors`` holds (field_path, message) pairs."""

    def __init__(self, message: str, errors: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.errors = tuple(errors)

    def __reduce__(self):
        return (self.__class__, (str(self), self.errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _non_empty_ref(value: str) -> str:
    if not value:
        raise ValueError("must be a non-empty path, URI or hub id")
    return value


class AdapterEntry(_Strict):
    """One adapter of the fleet."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    adapter: str
    lft_data: str | None = None
    eval_data: str | None = None
    overrides: OptionOverrides = Field(default_factory=OptionOverrides)

    @field_validator("name")
    @classmethod
    def _name_not_dots(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError("must not consist only of dots")
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_non_empty(cls, value: str) -> str:
        return _non_empty_ref(value)

    @field_validator("lft_data", "eval_data")
    @classmethod
    def _data_non_empty(cls, value: str | None) -> str | None:
        return None if value is None else _non_empty_ref(value)

    def effective_options(self, defaults: MigrationOptions | None = None) -> MigrationOptions:
        """``defaults`` updated with the explicitly set ``overrides`` and this entry's data references.

        An entry without LFT data (labelled data; for distillation, its prompts, seed prompts or data) is
        transferred only (``lft`` false), whatever the defaults say, unless its route distils (then the missing
        prompts are the route's error).  A contradiction is one :class:`~lorasuite_core.errors.LorasuiteError` line
        naming the entry.
        """
        values = (defaults or MigrationOptions()).model_dump(exclude_unset=True)
        values.update(self.overrides.model_dump(exclude_unset=True, exclude_none=True))
        values.update({k: v for k, v in (("lft_data", self.lft_data), ("eval_data", self.eval_data)) if v})
        options = validate(MigrationOptions, values, where=f"adapter {self.name}: ")
        if not options.has_lft_data and options.route not in DISTILL_ROUTES:
            options = validate(MigrationOptions, {**values, "lft": False}, where=f"adapter {self.name}: ")
        return options


class FleetManifest(_Strict):
    """A base-model upgrade and the adapters to migrate across it."""

    old_model: str
    new_model: str
    output_root: str
    defaults: MigrationOptions = Field(default_factory=MigrationOptions)
    analysis: AnalysisOptions = Field(default_factory=AnalysisOptions)
    adapters: list[AdapterEntry] = Field(min_length=1)

    @field_validator("old_model", "new_model", "output_root")
    @classmethod
    def _refs_non_empty(cls, value: str) -> str:
        return _non_empty_ref(value)

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[AdapterEntry]) -> list[AdapterEntry]:
        first_index: dict[str, int] = {}
        for index, entry in enumerate(adapters):
            if entry.name in first_index:
                raise PydanticCustomError(
                    _DUPLICATE_NAME_ERROR,
                    "duplicate adapter name '{name}' (first used by adapters[{first}])",
                    {"name": entry.name, "first": first_index[entry.name], "index": index},
                )
            first_index[entry.name] = index
        return adapters

    @model_validator(mode="after")
    def _models_differ(self) -> "FleetManifest":
        if self.old_model == self.new_model:
            raise PydanticCustomError(_SAME_MODEL_ERROR, "must differ from old_model")
        return self

    def effective_options(self, entry: AdapterEntry) -> MigrationOptions:
        """Options for ``entry`` with this manifest's defaults."""
        return entry.effective_options(self.defaults)

    def output_uri(self, entry: AdapterEntry | str) -> str:
        """``output_root/<name>`` (the root's trailing slashes are ignored)."""
        name = entry.name if isinstance(entry, AdapterEntry) else entry
        return f"{self.output_root.rstrip('/')}/{name}"

    def entry(self, name: str) -> AdapterEntry:
        """The entry called ``name``; KeyError if absent."""
        for candidate in self.adapters:
            if candidate.name == name:
                return candidate
        raise KeyError(f"no adapter named {name!r} in the fleet manifest")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<manifest>") -> "FleetManifest":
        """Validate already-parsed data; ManifestError names the offending field paths."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: <root>: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise manifest_error_from_validation(exc, source) from None

    @classmethod
    def loads(cls, text: str, source: str = "<manifest>") -> "FleetManifest":
        """Parse YAML or JSON text (format chosen from ``source``'s suffix) and validate."""
        return cls.from_dict(parse_manifest_text(text, source), source)

    @classmethod
    def load(cls, uri: str, *, storage_options: dict | None = None) -> "FleetManifest":
        """Read a manifest from a local path or fsspec URI and validate it."""
        from lorasuite_core.io.files import read_text
        from lorasuite_core.io.uris import redact_uri

        source = redact_uri(str(uri))
        try:
            text = read_text(uri, storage_options=storage_options)
        except FileNotFoundError:
            raise ManifestError(f"{source}: manifest file not found") from None
        except IsADirectoryError:
            raise ManifestError(f"{source}: is a directory, expected a manifest file") from None
        manifest = cls.loads(text, source)
        logger.debug("loaded fleet manifest %s: %d adapter(s)", source, len(manifest.adapters))
        return manifest


class BaseModelRelease(_Strict):
    """Event payload: ``new_model`` supersedes ``previous_model`` for the fleet in ``fleet_manifest``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)

    previous_model: str
    new_model: str
    fleet_manifest: str

    @field_validator("previous_model", "new_model", "fleet_manifest")
    @classmethod
    def _refs_non_empty(cls, value: str) -> str:
        return _non_empty_ref(value)


def format_error_location(loc: tuple[Any, ...]) -> str:
    """``("adapters", 2, "name")`` -> ``adapters[2].name``; empty -> ``<root>``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


def _error_path(error: dict) -> str:
    loc = tuple(error.get("loc", ()))
    if error.get("type") == _DUPLICATE_NAME_ERROR:
        loc = loc + (error["ctx"]["index"], "name")
    elif error.get("type") == _SAME_MODEL_ERROR:
        loc = loc + ("new_model",)
    return format_error_location(loc)


def manifest_error_from_validation(exc: ValidationError, source: str) -> ManifestError:
    """One-line ManifestError listing ``path: message`` for each pydantic error."""
    errors = tuple((_error_path(err), err["msg"]) for err in exc.errors(include_url=False))
    details = "; ".join(f"{path}: {msg}" for path, msg in errors)
    return ManifestError(f"invalid fleet manifest {source}: {details}", errors)


def _parse_yaml(text: str, source: str) -> Any:
    if _yaml is None:
        raise ManifestError(f"{source}: PyYAML is not installed; use a JSON manifest")
    try:
        return _yaml.safe_load(text)
    except _yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ManifestError(f"{source}: invalid YAML{where}: {problem}") from None


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def parse_manifest_text(text: str, source: str = "<manifest>") -> Any:
    """YAML for ``.yaml``/``.yml``, JSON for ``.json``; otherwise JSON, then YAML."""
    suffix = source.lower().rsplit(".", 1)[-1] if "." in source else ""
    if suffix in ("yaml", "yml"):
        return _parse_yaml(text, source)
    if suffix == "json" or _yaml is None:
        return _parse_json(text, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _parse_yaml(text, source)
