"""Tests for the storage modules of lorasuite_core.io (uris, retry, files, completion, fingerprints,
materialize, outputs, publish): local disk and a real local S3 server (moto)."""

from __future__ import annotations

import json
import logging
import pickle
import socket
from pathlib import Path

import pytest

from lorasuite_core.io import completion, files, fingerprints, materialize, publish, retry, uris
from lorasuite_core.io.completion import COMPLETE_MARKER
from lorasuite_core.io.materialize import IncompleteArtifactError, IntegrityError, UnsafeArtifactError
from lorasuite_core.io.outputs import DestinationExistsError
from lorasuite_core.io.retry import RetryPolicy, StorageUnavailableError

from tests.s3_server import s3_endpoint, s3fs_filesystem  # noqa: F401 - pytest fixture

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002)


def make_adapter_dir(root: Path, weight: bytes = b"\x00" * 64) -> Path:
    """A small PEFT-like directory with allowlisted files, a nested file and a pickle."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "old"}))
    (root / "adapter_model.safetensors").write_bytes(weight)
    (root / "tokenizer.model").write_bytes(b"spm")
    (root / "chat_template.jinja").write_text("{{ messages }}")
    (root / "README.md").write_text("# adapter\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "vocab.txt").write_text("a\nb\n")
    (root / "training_args.bin").write_bytes(b"pickle!")
    return root


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remote_keys(endpoint, uri: str, *, with_siblings: bool = False) -> list[str]:
    """Keys under ``uri``/ (with_siblings: any key starting with ``uri``, e.g. ``uri.tmp-*``)."""
    fs = s3fs_filesystem(endpoint)
    bucket_path = uri.removeprefix("s3://")
    prefix = bucket_path if with_siblings else bucket_path + "/"
    return sorted(p for p in fs.find(bucket_path.rsplit("/", 1)[0]) if p.startswith(prefix))


# --------------------------------------------------------------------------- retries


def test_with_retries_retries_then_succeeds(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="lorasuite_core.io.retry"):
        assert retry.with_retries(flaky, attempts=4, base_delay=0.001, uri="s3://b/k") == "ok"
    assert len(calls) == 3
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_with_retries_gives_up_with_storage_unavailable():
    calls = []

    def broken():
        calls.append(1)
        raise TimeoutError("still down")

    with pytest.raises(StorageUnavailableError) as info:
        retry.with_retries(broken, attempts=5, base_delay=0.001, max_delay=0.002, uri="s3://b/k")
    assert len(calls) == 5
    assert info.value.attempts == 5 and info.value.uri == "s3://b/k"
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "after 5 attempt(s)" in str(info.value) and "still down" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)


@pytest.mark.parametrize("error", [FileNotFoundError("nope"), PermissionError("denied"), ValueError("bug")])
def test_with_retries_does_not_retry_answers_or_bugs(error):
    calls = []

    def fails():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        retry.with_retries(fails, attempts=4, base_delay=0.001)
    assert len(calls) == 1


def test_secrets_are_redacted_from_retry_logs_and_errors(caplog):
    def leaky():
        raise OSError("GET https://h/b/k?X-Amz-Signature=SECRETSIG&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP failed")

    with caplog.at_level(logging.WARNING, logger="lorasuite_core.io.retry"):
        with pytest.raises(StorageUnavailableError) as info:
            retry.with_retries(leaky, attempts=2, base_delay=0.001, uri="https://user:pw@h/b/k?token=abc")
    logged = " ".join(r.getMessage() for r in caplog.records) + str(info.value)
    for secret in ("SECRETSIG", "AKIAABCDEFGHIJKLMNOP", "pw@", "token=abc"):
        assert secret not in logged
    assert uris.redact_uri("s3://k:s@bucket/p?sig=1") == "s3://***@bucket/p?<redacted>"


# --------------------------------------------------------------------------- local


def test_local_text_roundtrip(tmp_path):
    target = tmp_path / "deep" / "dir" / "f.json"
    files.write_text_atomic(target, json.dumps({"a": 1}))
    assert files.read_json(target) == {"a": 1}
    files.write_text_atomic(str(target), "{\"a\": 2}")
    assert files.read_text(f"file://{target}") == "{\"a\": 2}"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_local_publish_roundtrip_and_completion(tmp_path):
    source = make_adapter_dir(tmp_path / "src")
    dest = tmp_path / "out" / "bot"
    assert not completion.is_complete(dest)
    assert publish.publish_dir_atomic(source, str(dest)) == str(dest)
    assert (dest / "sub" / "vocab.txt").read_text() == "a\nb\n"
    assert completion.is_complete(dest)
    marker = json.loads((dest / COMPLETE_MARKER).read_text())
    listed = {entry["path"]: entry for entry in marker["files"]}
    assert listed["adapter_model.safetensors"]["sha256"] == files.sha256_file(source / "adapter_model.safetensors")
    assert listed["sub/vocab.txt"]["size"] == 4
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]  # no temp siblings
    (dest / "sub" / "vocab.txt").write_text("changed size")
    assert not completion.is_complete(dest)


def test_local_publish_refuses_non_empty_destination_and_overwrites_on_request(tmp_path):
    dest = tmp_path / "out"
    publish.publish_dir_atomic(make_adapter_dir(tmp_path / "v1"), dest)
    (dest / "stale.json").write_text("{}")
    newer = tmp_path / "v2"
    newer.mkdir()
    (newer / "adapter_config.json").write_text("{\"r\": 16}")
    with pytest.raises(DestinationExistsError, match="already holds a lorasuite publication"):
        publish.publish_dir_atomic(newer, dest)
    assert (dest / "adapter_model.safetensors").exists()
    publish.publish_dir_atomic(newer, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == [COMPLETE_MARKER, "adapter_config.json"]
    assert completion.is_complete(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v1", "v2"]


def test_local_publish_failure_leaves_no_trace(tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src")
    real_copy, calls = publish._copy_local_file, []

    def copy_then_fail(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_copy(src, dst)

    monkeypatch.setattr(publish, "_copy_local_file", copy_then_fail)
    with pytest.raises(OSError, match="injected"):
        publish.publish_dir_atomic(source, tmp_path / "out" / "bot")
    assert list((tmp_path / "out").iterdir()) == []


def test_local_materialize_returns_path_as_is(tmp_path):
    source = make_adapter_dir(tmp_path / "src")
    assert materialize.materialize_dir(str(source)) == source
    with pytest.raises(FileNotFoundError):
        materialize.materialize_dir(tmp_path / "missing")


def test_local_fingerprints_change_with_content(tmp_path):
    source = make_adapter_dir(tmp_path / "src")
    weights = source / "adapter_model.safetensors"
    file_before, dir_before = fingerprints.file_fingerprint(weights), fingerprints.dir_fingerprint(source)
    assert fingerprints.file_fingerprint(weights) == file_before
    (source / "notes.log").write_text("ignored by the default patterns")
    assert fingerprints.dir_fingerprint(source) == dir_before
    weights.write_bytes(b"\x01" * 80)
    assert fingerprints.file_fingerprint(weights) != file_before
    assert fingerprints.dir_fingerprint(source) != dir_before


# --------------------------------------------------------------------------- S3


def test_s3_text_roundtrip(s3_endpoint):
    uri = s3_endpoint.unique_uri("text") + "/manifest.json"
    files.write_text_atomic(uri, json.dumps({"x": [1, 2]}))
    assert files.read_json(uri) == {"x": [1, 2]}
    assert files.read_text(uri, storage_options=s3_endpoint.storage_options) == '{"x": [1, 2]}'
    with pytest.raises(FileNotFoundError):
        files.read_text(uri + ".missing", retry=FAST)


def test_s3_publish_then_materialize_with_cache(s3_endpoint, tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src")
    dest = s3_endpoint.unique_uri("pub") + "/bot"
    publish.publish_dir_atomic(source, dest)
    assert completion.is_complete(dest)
    assert f"{dest.removeprefix('s3://')}/training_args.bin" in remote_keys(s3_endpoint, dest)
    assert not [k for k in remote_keys(s3_endpoint, dest, with_siblings=True) if ".tmp-" in k]

    cache = tmp_path / "cache"
    local = materialize.materialize_dir(dest, cache)
    assert local.parent == cache
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == sorted([COMPLETE_MARKER, "README.md", "adapter_config.json", "adapter_model.safetensors",
                            "chat_template.jinja", "sub/vocab.txt", "tokenizer.model"])
    assert (local / "adapter_model.safetensors").read_bytes() == (source / "adapter_model.safetensors").read_bytes()

    fs, _ = uris.resolve(dest)
    monkeypatch.setattr(fs, "get_file", lambda *a, **k: pytest.fail("cache hit must not download"))
    assert materialize.materialize_dir(dest, cache) == local
    monkeypatch.undo()

    s3fs_filesystem(s3_endpoint).pipe_file(dest.removeprefix("s3://") + "/README.md", b"# changed\n")
    with pytest.raises(IntegrityError, match="README.md"):
        materialize.materialize_dir(dest, cache)
    assert sorted(p.name for p in cache.iterdir()) == [local.name]


def test_s3_publish_failure_midway_leaves_destination_and_staging_empty(s3_endpoint, tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src")
    dest = s3_endpoint.unique_uri("fail") + "/bot"
    fs, _ = uris.resolve(dest)
    real_put, calls = fs.put_file, []

    def put_then_fail(lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 2:
            raise RuntimeError("upload interrupted (injected)")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        publish.publish_dir_atomic(source, dest)
    assert ".tmp-" in calls[0]
    assert remote_keys(s3_endpoint, dest, with_siblings=True) == []
    assert not completion.is_complete(dest)


def test_s3_publish_persistent_errors_raise_unavailable_and_clean_up(s3_endpoint, tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src")
    dest = s3_endpoint.unique_uri("down") + "/bot"
    fs, _ = uris.resolve(dest)
    real_put, calls = fs.put_file, []

    def flaky_put(lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) >= 3:
            raise ConnectionError("connection reset (injected)")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    with pytest.raises(StorageUnavailableError, match="after 3 attempt"):
        publish.publish_dir_atomic(source, dest, retry=FAST)
    assert len(calls) == 2 + FAST.attempts
    assert remote_keys(s3_endpoint, dest, with_siblings=True) == []


def test_s3_readers_see_incomplete_until_manifest_is_written(s3_endpoint, tmp_path, monkeypatch):
    source = make_adapter_dir(tmp_path / "src")
    dest = s3_endpoint.unique_uri("race") + "/bot"
    real_write_marker, seen = publish._write_marker, {}

    def observe_then_write(fs, dest_path, uri, marker, policy):
        seen["complete"] = completion.is_complete(dest)
        seen["keys"] = remote_keys(s3_endpoint, dest)
        real_write_marker(fs, dest_path, uri, marker, policy)

    monkeypatch.setattr(publish, "_write_marker", observe_then_write)
    publish.publish_dir_atomic(source, dest)
    assert seen["complete"] is False
    # the six files plus our in-progress claim, no completion manifest yet
    assert len(seen["keys"]) == 8 and not any(k.endswith(COMPLETE_MARKER) for k in seen["keys"])
    assert any(k.endswith(completion.PUBLISHING_MARKER) for k in seen["keys"])
    assert completion.is_complete(dest)
    assert not any(k.endswith(completion.PUBLISHING_MARKER) for k in remote_keys(s3_endpoint, dest))
    assert not [k for k in remote_keys(s3_endpoint, dest, with_siblings=True) if ".tmp-" in k]


def test_s3_overwrite_refusal_and_replacement(s3_endpoint, tmp_path):
    dest = s3_endpoint.unique_uri("over") + "/bot"
    publish.publish_dir_atomic(make_adapter_dir(tmp_path / "v1"), dest)
    newer = tmp_path / "v2"
    newer.mkdir()
    (newer / "adapter_config.json").write_text('{"r": 16}')
    with pytest.raises(DestinationExistsError, match="already holds a lorasuite publication"):
        publish.publish_dir_atomic(newer, dest)
    assert completion.is_complete(dest)
    publish.publish_dir_atomic(newer, dest, overwrite=True)
    prefix = dest.removeprefix("s3://")
    assert remote_keys(s3_endpoint, dest) == [f"{prefix}/{COMPLETE_MARKER}", f"{prefix}/adapter_config.json"]
    assert completion.is_complete(dest)
    assert files.read_json(dest + "/adapter_config.json") == {"r": 16}


def test_s3_pickle_only_directory_is_refused(s3_endpoint, tmp_path):
    uri = s3_endpoint.unique_uri("pickle") + "/model"
    fs = s3fs_filesystem(s3_endpoint)
    fs.pipe_file(uri.removeprefix("s3://") + "/config.json", b"{}")
    fs.pipe_file(uri.removeprefix("s3://") + "/pytorch_model.bin", b"pickle")
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArtifactError, match="safetensors is required"):
        materialize.materialize_dir(uri, cache)
    with pytest.raises(IncompleteArtifactError, match="not \\(yet\\) completely published"):
        materialize.materialize_dir(uri, cache, require_complete=True)
    assert not cache.exists() or not any(cache.iterdir())


def test_s3_fingerprints_change_when_an_object_changes(s3_endpoint):
    uri = s3_endpoint.unique_uri("fp") + "/model"
    fs = s3fs_filesystem(s3_endpoint)
    key = uri.removeprefix("s3://") + "/model.safetensors"
    fs.pipe_file(key, b"A" * 32)
    fs.pipe_file(uri.removeprefix("s3://") + "/config.json", b"{}")
    file_before, dir_before = fingerprints.file_fingerprint(uri + "/model.safetensors"), fingerprints.dir_fingerprint(uri)
    assert fingerprints.dir_fingerprint(uri) == dir_before
    fs.pipe_file(key, b"B" * 32)  # same size, new content => new ETag
    assert fingerprints.file_fingerprint(uri + "/model.safetensors") != file_before
    assert fingerprints.dir_fingerprint(uri) != dir_before


def test_unreachable_endpoint_raises_storage_unavailable(s3_endpoint, tmp_path):
    options = {
        "endpoint_url": f"http://127.0.0.1:{closed_port()}",
        "config_kwargs": {"connect_timeout": 1, "retries": {"total_max_attempts": 1}},
    }
    with pytest.raises(StorageUnavailableError) as info:
        files.read_text("s3://lorasuite-test/any/file.json", storage_options=options, retry=FAST)
    assert info.value.attempts == FAST.attempts
    assert "s3://lorasuite-test/any/file.json" in str(info.value)
    assert "testing-secret" not in str(info.value)
    with pytest.raises(StorageUnavailableError):
        publish.publish_dir_atomic(make_adapter_dir(tmp_path / "src"), "s3://lorasuite-test/x",
                                   storage_options=options, retry=FAST)


def test_storage_errors_are_user_facing_lorasuite_errors():
    from lorasuite_core.errors import LorasuiteError

    assert issubclass(StorageUnavailableError, LorasuiteError)
    assert issubclass(UnsafeArtifactError, LorasuiteError)


def test_one_retry_layer_one_request_per_attempt(monkeypatch):
    """botocore and s3fs make one try each: N attempts of ours are N requests on the wire, not N x 5 x 2."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    connections = []

    def accept_and_drop():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn.recv(65536).split(b"\r\n", 1)[0])   # the request line; hang up unanswered
            conn.close()

    threading.Thread(target=accept_and_drop, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        counts = []
        for attempts in (1, 3):
            connections.clear()
            with pytest.raises(retry.StorageUnavailableError, match=rf"after {attempts} attempt\(s\)"):
                files.read_bytes("s3://bucket/key.json", retry=retry.RetryPolicy(attempts=attempts, base_delay=0.01))
            counts.append(len(connections))
    finally:
        listener.close()
        s3fs.S3FileSystem.clear_instance_cache()
    # one attempt = one cat_file: s3fs's size lookup (HEAD, and its one fallback HEAD), no GET without a size;
    # with botocore's and s3fs's own retries on top it was 20 requests per attempt
    assert 1 <= counts[0] <= 2, connections
    assert counts[1] == 3 * counts[0]
