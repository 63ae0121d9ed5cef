"""Concurrent runs on one cache root compute each stage once (reliability issue, finding A).

Real processes (multiprocessing, spawn) race on one entry of a local root and of an S3 root
(moto's server on 127.0.0.1): the compute function appends a line to a log file and sleeps, so
the log says how often it ran.  A stale lease (holder gone) is taken over; a dead local holder
never blocks a waiter; a bounded wait ends as a LorasuiteError.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import filelock
import pytest

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.stage_store import StageStore
from tests.s3_server import s3_endpoint  # noqa: F401  (fixture)

STAGE = "demo"
KEY = "k" * 64


def _compute_factory(calls: Path, sleep_s: float):
    def compute(out: Path) -> dict:
        with open(calls, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(sleep_s)
        (out / "value.txt").write_text("42\n")
        return {"value": 42, "computed_by": os.getpid()}

    return compute


def _child(root: str, store_options: dict, calls: str, sleep_s: float, barrier, result: str) -> None:
    logging.basicConfig(level=logging.INFO, filename=result + ".log", force=True)
    store = StageStore(root, **store_options)
    barrier.wait()
    outcome = store.run(STAGE, KEY, _compute_factory(Path(calls), sleep_s))
    Path(result).write_text(json.dumps({"reused": outcome.reused, "facts": outcome.facts}))


def _race(tmp_path: Path, root: str, store_options: dict, sleep_s: float) -> tuple[list[str], list[dict], str]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    calls = tmp_path / "calls.txt"
    results = [str(tmp_path / f"result-{n}.json") for n in range(2)]
    children = [ctx.Process(target=_child, args=(root, store_options, str(calls), sleep_s, barrier, r))
                for r in results]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=180)
        assert child.exitcode == 0, f"child exited with {child.exitcode}"
    logs = "".join(Path(r + ".log").read_text() for r in results)
    return (calls.read_text().splitlines(), [json.loads(Path(r).read_text()) for r in results], logs)


def _assert_computed_once(calls: list[str], outcomes: list[dict], logs: str) -> None:
    assert len(calls) == 1, f"compute ran {len(calls)} times"
    assert sorted(o["reused"] for o in outcomes) == [False, True]
    assert outcomes[0]["facts"] == outcomes[1]["facts"] == {"value": 42, "computed_by": int(calls[0])}
    assert logs.count(f"waiting for another run computing {STAGE}") == 1


def test_two_processes_on_one_local_root_compute_once(tmp_path):
    root = str(tmp_path / "cache")
    calls, outcomes, logs = _race(tmp_path, root, {}, sleep_s=1.0)
    _assert_computed_once(calls, outcomes, logs)
    store = StageStore(root)
    assert (Path(store.location(STAGE, KEY)) / "value.txt").read_text() == "42\n"
    assert Path(store.lock_location(STAGE, KEY)).parent == Path(root) / ".locks"


def test_two_processes_on_one_s3_root_compute_once_with_renewed_lease(tmp_path, s3_endpoint):
    # the compute (3 s) outlives the lease ttl (1.5 s): only renewal keeps the waiter from taking over
    root = s3_endpoint.unique_uri("locking")
    options = {"lease_ttl_s": 1.5, "lease_poll_s": 0.1}
    calls, outcomes, logs = _race(tmp_path, root, options, sleep_s=3.0)
    _assert_computed_once(calls, outcomes, logs)
    store = StageStore(root, **options)
    assert store.is_complete(STAGE, KEY)
    assert "took over" not in logs and "lost the lease" not in logs
    from lorasuite_core.io import uris

    fs, lease_path = uris.resolve(store.lock_location(STAGE, KEY))
    assert not fs.exists(lease_path), "the holder deletes its lease after publishing"


def _dead_pid() -> int:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    return child.pid


@pytest.mark.parametrize("expires_in", [-30.0, 1.5])
def test_stale_s3_lease_of_a_gone_holder_is_taken_over(tmp_path, s3_endpoint, caplog, expires_in):
    from lorasuite_core.io import files, uris

    store = StageStore(s3_endpoint.unique_uri("stale"), lease_ttl_s=30.0, lease_poll_s=0.1)
    lease_uri = store.lock_location(STAGE, KEY)
    assert lease_uri.endswith(f"/.leases/{STAGE}/{KEY}.json")
    files.write_text_atomic(lease_uri, json.dumps({
        "owner": "gone", "host": "elsewhere", "pid": _dead_pid(), "stage": STAGE, "key": KEY,
        "renewed_at": time.time() - 60, "expires_at": time.time() + expires_in, "ttl_s": 30.0}))
    calls = tmp_path / "calls.txt"
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lorasuite_core.pipeline.stage_store"):
        outcome = store.run(STAGE, KEY, _compute_factory(calls, 0.0))
    waited = time.monotonic() - started
    assert not outcome.reused and outcome.facts["value"] == 42
    assert calls.read_text().splitlines() == [str(os.getpid())]
    assert "took over the expired lease" in caplog.text and "elsewhere" in caplog.text
    if expires_in > 0:   # a lease not yet expired is waited for, then taken over
        assert "waiting for another run computing demo" in caplog.text
        assert waited >= expires_in - 0.2
    else:
        assert "waiting for another run" not in caplog.text
    fs, path = uris.resolve(lease_uri)
    assert not fs.exists(path)


def test_live_s3_lease_is_waited_for_until_the_timeout(s3_endpoint):
    from lorasuite_core.io import files

    store = StageStore(s3_endpoint.unique_uri("live"), lease_poll_s=0.1, lock_timeout_s=0.5)
    files.write_text_atomic(store.lock_location(STAGE, KEY), json.dumps(
        {"owner": "alive", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 300}))
    with pytest.raises(LorasuiteError, match=r"gave up after \d+s waiting for another run computing demo"):
        store.run(STAGE, KEY, _compute_factory(Path(os.devnull), 0.0))


def test_local_wait_is_bounded_by_the_lock_timeout(tmp_path):
    store = StageStore(str(tmp_path / "cache"), lock_timeout_s=0.3)
    Path(store.lock_location(STAGE, KEY)).parent.mkdir(parents=True)
    with filelock.FileLock(store.lock_location(STAGE, KEY)):
        with pytest.raises(LorasuiteError, match="waiting for another run computing demo") as info:
            store.run(STAGE, KEY, _compute_factory(tmp_path / "calls.txt", 0.0))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "calls.txt").exists()
    assert not store.run(STAGE, KEY, _compute_factory(tmp_path / "calls.txt", 0.0)).reused


def _hold_forever(root: str, calls: str) -> None:
    StageStore(root).run(STAGE, KEY, _compute_factory(Path(calls), 600.0))


def test_a_killed_local_holder_does_not_block_the_next_run(tmp_path):
    root, calls = str(tmp_path / "cache"), tmp_path / "calls.txt"
    holder = multiprocessing.get_context("spawn").Process(target=_hold_forever, args=(root, str(calls)))
    holder.start()
    deadline = time.monotonic() + 120
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls.exists(), "the holder never started computing"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    started = time.monotonic()
    outcome = StageStore(root, lock_timeout_s=30).run(STAGE, KEY, _compute_factory(calls, 0.0))
    assert not outcome.reused and time.monotonic() - started < 10
    assert calls.read_text().splitlines() == [str(holder.pid), str(os.getpid())]
