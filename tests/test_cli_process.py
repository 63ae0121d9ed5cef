"""The CLI as a user runs it: a real ``lorasuite`` process on the embedded default (no
``PREFECT_API_URL``: it starts its own private API server), killed, interrupted or fed bad input.

* an error raised deep inside the flow ends with one ``lorasuite: error:`` line, no traceback,
  exit 2 — the details are in the log file;
* credentials inside a URI never appear on the terminal or in the log file;
* SIGKILL or SIGTERM of the CLI leaves no Prefect server behind, and a migration killed
  mid-analysis reruns to a bit-identical adapter.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file

from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

SERVER_MARK = "prefect.server.api.server:create_app"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-process")
    old = make_tiny_model_dir("llama", root / "old", seed=21)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, identity_layers=(1,)))
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=22)
    return root, old, new, adapter


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(LORASUITE_LOG_DIR=str(tmp_path / "logs"), LORASUITE_DOWNLOAD_DIR=str(tmp_path / "materialized"),
               PREFECT_HOME=str(tmp_path / "prefect-home"), OMP_NUM_THREADS="1")
    return env


def migrate_cmd(old, new, adapter, out, cache, *extra) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "migrate", "--old-model", str(old), "--new-model", str(new),
            "--adapter", str(adapter), "--output", str(out), "--no-lft", "--max-calibration-tokens", "256",
            "--cache-root", str(cache), *extra]


def servers_of(pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if SERVER_MARK in cmdline and proc.info["ppid"] == pid:
            found.append(proc)
    return found


def servers_under(root: Path) -> set[int]:
    """Pids of the live Prefect API servers whose PREFECT_HOME lies under ``root``."""
    pids = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        if SERVER_MARK in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            try:
                home = proc.environ().get("PREFECT_HOME", "")
            except psutil.Error:
                continue
            if home.startswith(str(root)):
                pids.add(proc.pid)
    return pids


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_error_inside_the_flow_is_one_line(pair, tmp_path):
    root, old, new, adapter = pair
    broken = tmp_path / "broken-new"
    broken.mkdir()
    for f in new.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.up_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    run = subprocess.run(migrate_cmd(old, broken, adapter, out, tmp_path / "cache"), env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("lorasuite: error: ") and name in lines[-1] and "NaN" in lines[-1], lines[-1]
    assert "Traceback" not in run.stderr and "prefect" not in run.stderr.lower()
    assert not out.exists()
    logs = list((tmp_path / "logs").glob("*-migrate-*.log"))
    assert len(logs) == 1 and name in logs[0].read_text()


def test_credentials_in_a_uri_are_never_shown(pair, tmp_path):
    root, old, new, _ = pair
    secret = "Sup3rSecretValueXYZ"
    key = "AKIAABCDEFGHIJKLMNOP"
    env = cli_env(tmp_path)
    env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1", AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="y")
    adapter = f"s3://{key}:{secret}@bucket/adapters/a"
    run = subprocess.run(migrate_cmd(old, new, adapter, tmp_path / "out", tmp_path / "cache"), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("lorasuite: error: ")
    logged = "".join(p.read_text() for p in (tmp_path / "logs").glob("*"))
    for text in (run.stderr, run.stdout, logged):
        assert secret not in text and key not in text


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """The adapter of an uninterrupted run, fresh cache."""
    root, old, new, adapter = pair
    tmp = tmp_path_factory.mktemp("reference")
    run = subprocess.run(migrate_cmd(old, new, adapter, tmp / "out", tmp / "cache"), env=cli_env(tmp),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return tmp / "out"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_cli_leaves_no_server_and_reruns_bit_identical(pair, reference, tmp_path, sig):
    root, old, new, adapter = pair
    env = cli_env(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")          # the run's temporary directories, to look at
    (tmp_path / "tmp").mkdir()
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = subprocess.Popen(migrate_cmd(old, new, adapter, out, cache), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = wait_for(lambda: servers_of(proc.pid), 300, "the embedded server")[0]
        # mid-analysis: the first pair-analysis entry is stored, the adapter is not yet written
        wait_for(lambda: (cache / "vocabulary").is_dir() and any((cache / "vocabulary").iterdir()), 300,
                 "the first analysis stage")
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 30,
             "the embedded server to stop")
    assert not out.exists() or not (out / "adapter_model.safetensors").exists()
    left = sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith(f"lorasuite-prefect-{proc.pid}-"))
    if sig != signal.SIGKILL:
        assert left == []           # SIGTERM: the run removed its own
        return   # the rerun after a kill is checked once, after the harshest signal
    assert len(left) == 1           # SIGKILL: nothing ran; the next run removes it (issue 19, finding 4)

    rerun = subprocess.run(migrate_cmd(old, new, adapter, out, cache), env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("lorasuite-")] == []
    # the servers of this test's CLI runs (their PREFECT_HOME lies under its TMPDIR): other tests on the
    # machine may start servers of their own meanwhile
    wait_for(lambda: not servers_under(tmp_path / "tmp"), 30, "every server started by the CLI runs to stop")


def in_private_mount(mountpoint: Path, options: str, cmd: list[str]) -> list[str]:
    """``cmd`` in a private mount namespace with a small tmpfs at ``mountpoint`` (root only)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mountpoint}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs {mountpoint} && exec "$@"', "sh", *cmd]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared") / "cache"


@pytest.mark.parametrize("case, options, needle", [
    ("full output", "size=8k", "No space left"),
    ("read-only output", "ro,size=64k", "Read-only file system"),
    ("full cache", "size=8k", "No space left"),
])
def test_full_and_read_only_locations_are_one_line(pair, shared_cache, tmp_path, case, options, needle):
    root, old, new, adapter = pair
    mnt = tmp_path / "mnt"
    out, cache = (mnt / "adapter", shared_cache) if "output" in case else (tmp_path / "out", mnt / "cache")
    run = subprocess.run(in_private_mount(mnt, options, migrate_cmd(old, new, adapter, out, cache)),
                         env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("lorasuite: error: ") and needle in last, last
    assert "Traceback" not in run.stderr
    assert not any(mnt.iterdir()), "the tmpfs is private to the process: nothing may show here"
    assert not out.exists()


def test_overlapping_runs_on_a_busy_machine_both_succeed(pair, reference, tmp_path):
    root, old, new, adapter = pair
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        env = cli_env(tmp_path)
        runs = [subprocess.Popen(migrate_cmd(old, new, adapter, tmp_path / f"out{i}", tmp_path / "cache"), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        results = [(r.wait(timeout=900), r.stderr.read()) for r in runs]
    finally:
        for burner in burners:
            burner.kill()
    for code, err in results:
        assert code == 0, err
        assert "database is locked" not in err and "Timed out" not in err
    for i in range(2):
        assert ((tmp_path / f"out{i}" / "adapter_model.safetensors").read_bytes()
                == (reference / "adapter_model.safetensors").read_bytes())
