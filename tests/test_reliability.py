"""Reliability and security findings (issue 9): nothing from the cache is executed, no input is
destroyed, corrupt cache entries are discarded, interrupted publications are recognised as ours.

Every test drives the real CLI (``lorasuite migrate`` through the Prefect flow on the session's
test server) on a tiny model pair, or the storage layer against moto's S3 server on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorasuite_core.io import completion, outputs, publish, retry, uris
from flows.cli import main
from lorasuite_core.pipeline.stage_store import FACTS_FILE
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from tests.drop_proxy import DroppingProxy
from tests.s3_server import s3_endpoint, s3fs_filesystem  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    old = make_tiny_model_dir("llama", root / "old", seed=13)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, extra_neurons=8))
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=14)
    return root, old, new, adapter


def migrate(old, new, adapter, out, cache, *extra):
    return main(["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--max-calibration-tokens", "256", "--cache-root", str(cache),
                 *extra])


def listing(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    assert lines[-1].startswith("lorasuite: error: "), lines[-1]
    return lines[-1]


def store_entries(cache: Path) -> list[tuple[str, str, Path]]:
    return [(stage.name, entry.name, entry) for stage in sorted(cache.iterdir()) if stage.is_dir()
            for entry in sorted(stage.iterdir()) if (entry / FACTS_FILE).is_file()]


# --------------------------------------------------------------------------- finding 1: no code from the cache


def _pickle_record(sentinel: Path) -> bytes:
    """A genuine Prefect result record whose serializer is pickle and whose payload touches ``sentinel``."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    record = ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(picklelib="pickle")),
                          result=Payload())
    return record.serialize()


def test_planted_pickle_records_are_never_executed(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    cache = tmp_path / "cache"
    assert migrate(old, new, adapter, tmp_path / "first", cache) == 0
    first = listing(tmp_path / "first")
    sentinel = tmp_path / "PWNED"
    record = _pickle_record(sentinel)
    # plant a record under every name Prefect's task cache would look up (the earlier layout's keys),
    # in the result folder the earlier layout used, and at the root of the cache
    results = cache / "prefect-results"
    results.mkdir()
    planted = {name for stage, key, _ in store_entries(cache) for name in (f"lorasuite-{stage}-{key}", key)}
    for name in planted:
        (results / name).write_bytes(record)
    assert len(planted) >= 2 * 7
    assert migrate(old, new, adapter, tmp_path / "second", cache) == 0, capsys.readouterr().err
    assert not sentinel.exists(), "a planted pickle record was executed"
    second = listing(tmp_path / "second")
    weights = "adapter_model.safetensors"
    assert second[weights] == first[weights]
    # and nothing of Prefect's is written into the cache
    assert {stage for stage, _, _ in store_entries(cache)} >= {"vocabulary", "head_similarity", "layer", "migrated"}
    assert set(os.listdir(results)) == planted
    assert all(p.read_bytes() == record for p in results.iterdir())


# --------------------------------------------------------------------------- finding 2: inputs never destroyed


def test_output_may_not_be_an_input_or_the_working_directory(pair, tmp_path, capsys, monkeypatch):
    root, old, new, adapter = pair
    cache = tmp_path / "cache"
    before = {p: listing(p) for p in (old, new, adapter)}
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    cases = [
        ("", "output is empty"),
        (".", "current directory"),
        (str(cwd.parent), "current directory"),
        (str(new), "new model"),
        (str(adapter), "adapter"),
        (str(root), "old model"),                    # a parent of every input
        (str(old / "sub"), "inside the old model"),
        (str(cache), "cache root"),
    ]
    for output, needle in cases:
        for extra in ((), ("--overwrite",)):
            assert migrate(old, new, adapter, output, cache, *extra) == 2, (output, extra)
            line = last_error_line(capsys)
            assert needle in line, (output, line)
    assert {p: listing(p) for p in (old, new, adapter)} == before
    assert listing(cwd) == {"notes.txt": b"mine"}
    assert not (old / "sub").exists()


def test_overwrite_replaces_only_our_publication(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    cache = tmp_path / "cache"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    for extra in ((), ("--overwrite",)):
        assert migrate(old, new, adapter, foreign, cache, *extra) == 2
        assert "not written by lorasuite" in last_error_line(capsys)
    assert listing(foreign) == {"keep.txt": b"precious"}

    ours = tmp_path / "ours"
    assert migrate(old, new, adapter, ours, cache) == 0
    published = listing(ours)
    assert completion.COMPLETE_MARKER in published
    assert migrate(old, new, adapter, ours, cache) == 2
    assert "--overwrite" in last_error_line(capsys)
    assert migrate(old, new, adapter, ours, cache, "--overwrite") == 0
    assert listing(ours)["adapter_model.safetensors"] == published["adapter_model.safetensors"]


# --------------------------------------------------------------------------- finding 3: integrity


def test_tampered_and_corrupt_cache_entries_are_recomputed(pair, tmp_path, capsys, caplog):
    root, old, new, adapter = pair
    cache = tmp_path / "cache"
    assert migrate(old, new, adapter, tmp_path / "clean", cache) == 0
    clean = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    entries = {stage: path for stage, _, path in store_entries(cache)}

    # overwrite 4 KiB in place inside the cached migrated adapter (same size: a size check can't see it)
    weights = entries["migrated"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) > 4096 + 256
    data[256:256 + 4096] = b"\xff" * 4096
    weights.write_bytes(bytes(data))
    # break the safetensors header of the cached pair analysis
    analysis = entries["head_similarity"] / "matches.safetensors"
    raw = bytearray(analysis.read_bytes())
    raw[8:24] = b"{not json at all"
    analysis.write_bytes(bytes(raw))
    capsys.readouterr()

    with caplog.at_level("WARNING", logger="lorasuite_core"):
        assert migrate(old, new, adapter, tmp_path / "again", cache) == 0
    warnings = {r.getMessage() for r in caplog.records       # a set: Prefect's run-log forwarding re-handles records
                if r.name == "lorasuite_core.pipeline.stage_store" and r.levelname == "WARNING"}
    assert len(warnings) == 2 and all("discarding cache entry" in w and "sha256" in w for w in warnings), warnings
    assert {w.split(":")[0] for w in warnings} == {"migrated", "head_similarity"}
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == clean.keys()
    assert all(again[k].isfinite().all() and (again[k] == clean[k]).all() for k in clean)
    # the entries were recomputed in place and verify again
    assert completion.verify_local_dir(entries["migrated"]) is None
    assert completion.verify_local_dir(entries["head_similarity"]) is None


def test_entry_without_manifest_is_discarded(tmp_path, caplog):
    from lorasuite_core.pipeline.stage_store import StageStore, stage_key

    store = StageStore(str(tmp_path / "store"))
    key = stage_key("demo", x=1)
    entry = tmp_path / "store" / "demo" / key
    entry.mkdir(parents=True)
    (entry / FACTS_FILE).write_text('{"answer": "planted"}')
    with caplog.at_level("WARNING"):
        result = store.run("demo", key, lambda out: {"answer": 42})
    assert result.facts == {"answer": 42} and not result.reused
    assert any("discarding cache entry" in r.getMessage() for r in caplog.records)
    assert store.run("demo", key, lambda out: pytest.fail("recomputed a verified entry")).reused


# --------------------------------------------------------------------------- finding 4: interrupted publication


def test_publication_cut_short_mid_copy_is_replaced_on_a_plain_rerun(s3_endpoint, tmp_path):  # noqa: F811
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (source / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (source / "migration_report.json").write_text("{}")
    dest = s3_endpoint.unique_uri("crash") + "/bot"
    fast = retry.RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
    with DroppingProxy(s3_endpoint.url, drop_after_copies=1) as proxy:
        options = {**s3_endpoint.storage_options,
                   "client_kwargs": {**s3_endpoint.storage_options["client_kwargs"], "endpoint_url": proxy.url},
                   "config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True}
        with pytest.raises(uris.StorageError):
            publish.publish_dir_atomic(source, dest, storage_options=options, retry=fast)
        assert proxy.dropped > 0
    fs = s3fs_filesystem(s3_endpoint)
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.find(dest.removeprefix("s3://")))
    assert completion.PUBLISHING_MARKER in left and completion.COMPLETE_MARKER not in left
    assert "adapter_config.json" in left          # one object made it: the crash the issue describes
    assert outputs.output_state(dest, storage_options=s3_endpoint.storage_options) == "partial"
    # a plain rerun (no overwrite) recognises the interrupted publication as ours and replaces it
    publish.publish_dir_atomic(source, dest, storage_options=s3_endpoint.storage_options)
    assert outputs.output_state(dest, storage_options=s3_endpoint.storage_options) == "complete"
    fs.invalidate_cache()
    final = sorted(p.rsplit("/", 1)[-1] for p in fs.find(dest.removeprefix("s3://")))
    assert final == sorted(["adapter_config.json", "adapter_model.safetensors", "migration_report.json",
                            completion.COMPLETE_MARKER])


def test_foreign_remote_content_is_refused_even_with_overwrite(s3_endpoint, tmp_path):  # noqa: F811
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    dest = s3_endpoint.unique_uri("foreign") + "/bot"
    fs = s3fs_filesystem(s3_endpoint)
    fs.pipe_file(dest.removeprefix("s3://") + "/precious.txt", b"keep")
    for overwrite in (False, True):
        with pytest.raises(outputs.DestinationExistsError, match="not written by lorasuite"):
            publish.publish_dir_atomic(source, dest, overwrite=overwrite, storage_options=s3_endpoint.storage_options)
    assert fs.cat_file(dest.removeprefix("s3://") + "/precious.txt") == b"keep"


def test_output_checks_compare_remote_prefixes():
    check = outputs.check_output_location
    check("s3://bucket/out/a", {"model": "s3://bucket/models/a", "other": "s3://other/out/a"})
    with pytest.raises(outputs.UnsafeOutputError, match="model or a directory above it"):
        check("s3://bucket/models/", {"model": "s3://bucket/models/a"})
    with pytest.raises(outputs.UnsafeOutputError, match="inside the model"):
        check("s3://bucket/models/a/migrated", {"model": "s3://bucket/models/a"})
    with pytest.raises(outputs.UnsafeOutputError, match="bucket root"):
        check("s3://bucket", {})
    check("s3://bucket/models/ab", {"model": "s3://bucket/models/a"})   # a sibling sharing a name prefix


# --------------------------------------------------------------------------- finding 6: fleets and credentials


def _fleet(tmp_path: Path, old, new, adapters: dict[str, Path], output_root: Path) -> Path:
    manifest = tmp_path / "fleet.json"
    manifest.write_text(json.dumps({
        "old_model": str(old), "new_model": str(new), "output_root": str(output_root),
        "analysis": {"max_calibration_tokens": 256},
        "adapters": [{"name": name, "adapter": str(path)} for name, path in adapters.items()]}))
    return manifest


def test_fleet_nan_adapter_fails_only_its_entry(pair, tmp_path, capsys):
    from safetensors.torch import save_file

    root, old, new, adapter = pair
    bad = tmp_path / "nan-adapter"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    manifest = _fleet(tmp_path, old, new, {"good": adapter, "bad": bad}, tmp_path / "out")
    code = main(["-q", "migrate-fleet", "--manifest", str(manifest), "--cache-root", str(tmp_path / "cache")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    assert summary["published"] == ["good"]
    (failed,) = summary["failed"]
    assert failed["name"] == "bad" and name in failed["error"] and "NaN" in failed["error"]
    assert (tmp_path / "out" / "good" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "bad").exists()


def test_fleet_output_root_that_is_a_file(pair, tmp_path, capsys):
    root, old, new, adapter = pair
    output_root = tmp_path / "out-file"
    output_root.write_text("a file")
    manifest = _fleet(tmp_path, old, new, {"a": adapter}, output_root)
    assert main(["-q", "migrate-fleet", "--manifest", str(manifest), "--cache-root", str(tmp_path / "cache")]) == 2
    line = last_error_line(capsys)
    assert "output_root" in line and "is a file" in line, line
    assert output_root.read_text() == "a file"


class _Forbidden:
    """An S3 endpoint on 127.0.0.1 that refuses every request as S3 does for wrong credentials."""

    def __enter__(self):
        import http.server
        import threading

        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self):
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _refuse

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_refused_credentials_are_one_line(pair, tmp_path, capsys, monkeypatch):
    root, old, new, adapter = pair
    with _Forbidden() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        code = migrate(old, new, "s3://bucket/adapters/a", tmp_path / "out", tmp_path / "cache")
    assert code == 2
    line = last_error_line(capsys)
    assert "PermissionError" in line or "Forbidden" in line or "denied" in line.lower(), line
    assert "wrong-secret-value" not in line and "AKIAWRONGWRONGWRONG1" not in line
    assert not (tmp_path / "out").exists()
