"""Pytest fixture: a real S3-compatible HTTP server (moto) on 127.0.0.1 for storage tests.

Design
------
``s3_endpoint`` (session scope) starts moto's ``ThreadedMotoServer`` on 127.0.0.1
with an OS-assigned free port (port 0, read back after binding, so there is no
race between picking and binding a port), points the standard AWS environment
variables at it (fake credentials, region, ``AWS_ENDPOINT_URL``; profiles and
session tokens cleared, shared config files redirected to nowhere, 127.0.0.1
excluded from proxies), creates one bucket and yields an :class:`S3Endpoint`.
At teardown the environment is restored exactly and the server is stopped.

Use it from a test module with ``from tests.s3_server import s3_endpoint``
(no conftest needed).  Tests share the bucket, so each test should write under
its own prefix, e.g. ``s3_endpoint.unique_uri("case")``.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

BUCKET = "lorasuite-test"
REGION = "us-east-1"
FAKE_KEY = "testing-key"
FAKE_SECRET = "testing-secret"


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 server listens, and how to talk to it."""

    url: str
    bucket: str
    region: str = REGION
    storage_options: dict[str, Any] = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}"] + [p.strip("/") for p in parts if p])

    def unique_uri(self, label: str = "t") -> str:
        """A fresh prefix in the bucket, for test isolation."""
        return self.uri(f"{label}-{uuid.uuid4().hex[:12]}")


def s3_storage_options(url: str) -> dict[str, Any]:
    """s3fs storage options for an endpoint with the fake credentials."""
    return {
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
        "client_kwargs": {"endpoint_url": url, "region_name": REGION},
    }


def s3fs_filesystem(endpoint: S3Endpoint):
    """A fresh (uncached) ``s3fs.S3FileSystem`` pointed at ``endpoint``."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **endpoint.storage_options)


def _point_environment_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/lorasuite-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/lorasuite-test-aws-credentials")
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        existing = [h for h in os.environ.get(name, "").split(",") if h]
        monkeypatch.setenv(name, ",".join(existing + ["127.0.0.1", "localhost"]))


def _create_bucket(url: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=url, region_name=REGION,
        aws_access_key_id=FAKE_KEY, aws_secret_access_key=FAKE_SECRET,
    )
    client.create_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A moto S3 server on 127.0.0.1 with one bucket; AWS env vars point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    monkeypatch = pytest.MonkeyPatch()
    werkzeug_logger = logging.getLogger("werkzeug")
    werkzeug_level = werkzeug_logger.level
    werkzeug_logger.setLevel(logging.WARNING)  # no per-request log lines
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        _point_environment_at(monkeypatch, url)
        _create_bucket(url, BUCKET)
        yield S3Endpoint(url=url, bucket=BUCKET, storage_options=s3_storage_options(url))
    finally:
        monkeypatch.undo()
        werkzeug_logger.setLevel(werkzeug_level)
        server.stop()
