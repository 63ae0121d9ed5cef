"""URIs: one way to name local disk and object storage (s3://, file://, any fsspec URI), and to log them.

Design
------
* **Resolution.** :func:`resolve` maps a URI or path to ``(fs, path)`` through
  ``fsspec.core.url_to_fs``.  Plain paths (``~`` expanded) and ``file://`` go to
  the local filesystem; ``s3://`` / ``s3a://`` go to s3fs.  For S3 the endpoint
  comes from ``storage_options`` or else ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL``; credentials are left to botocore's standard chain
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles / roles) unless
  given as ``key`` / ``secret`` in ``storage_options``.  There is one retry layer
  (:mod:`lorasuite_core.io.retry`): botocore makes one attempt per call (unless
  configured by the caller or ``AWS_MAX_ATTEMPTS``) and so does s3fs (its ``retries``
  set to 1), so that :func:`~lorasuite_core.io.retry.with_retries` alone decides,
  waits and logs, and "after N attempts" counts the requests sent.  Credentials
  inside a URI are refused.
* **No secrets in logs.** URIs are logged through :func:`redact_uri` (no
  user-info, no query string); error texts are scrubbed of query strings and
  access-key ids (:func:`redact_text`, :func:`describe_error`); ``storage_options``
  are never logged.

:class:`StorageError` is the base of every storage error of ``lorasuite_core.io``.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec

from lorasuite_core.errors import LorasuiteError

LOCAL_PROTOCOLS = ("file", "local")
_S3_PROTOCOLS = ("s3", "s3a")


class StorageError(LorasuiteError, RuntimeError):
    """Base class of the storage errors (user-facing: the CLI prints them as one line)."""


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


# --------------------------------------------------------------------------- resolution


def as_uri(uri: str | os.PathLike) -> str:
    """The text of a URI, or of a plain path with ``~`` expanded."""
    text = os.fspath(uri)
    return text if "://" in text else os.path.expanduser(text)


def protocol_of(uri: str) -> str:
    """The scheme of a URI in lower case; ``file`` for a plain path."""
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
    text = as_uri(uri)
    if "://" in text and "@" in urlsplit(text).netloc:
        raise StorageError(f"{redact_uri(text)}: credentials inside a URI are not accepted (they end up in "
                           "shell histories and logs); use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile "
                           "or a role")
    options = dict(storage_options or {})
    if protocol_of(text) in _S3_PROTOCOLS:
        options = _s3_options(options)
    fs, path = fsspec.core.url_to_fs(text, **options)
    if protocol_of(text) in _S3_PROTOCOLS:
        fs.retries = 1          # s3fs's own retry loop (a class attribute, 5): one try, with_retries decides
    return fs, path


def is_local_fs(fs) -> bool:
    """True for fsspec's local filesystem."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def is_remote(uri: str | os.PathLike) -> bool:
    """True unless ``uri`` is a plain path or ``file://`` / ``local://`` URI."""
    return protocol_of(as_uri(uri)) not in LOCAL_PROTOCOLS


def join_uri(base: str, *parts: str) -> str:
    """Join with ``/`` (URIs) or the OS separator (plain paths)."""
    if "://" in str(base):
        return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(str(base), *parts)
