"""The shipped deployments on a real Prefect server, set up the documented way (``make serve``).

One module-scoped stack: ``python -m deployments.local up`` (what ``make serve`` runs) starts
``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME under tmp, creates the
pool, deploys ``deployments/prefect.yaml`` unchanged and starts a process worker; ``down`` (and,
should that fail, a kill of the recorded process groups) tears it down even when a test fails.
The stage store comes from the Prefect Variable ``lorasuite_cache_root`` that ``up --cache-root``
sets (the worker's environment has no ``LORASUITE_CACHE_ROOT``), so the pull step is exercised.

Runs, on tiny llama models on local disk (the new one has more query heads and an extra layer):
the nightly deployment with no manifest configured (Completed, "no fleet manifest configured"),
then with the Prefect Variable ``lorasuite_fleet_manifest`` (Completed, adapters load in PEFT), a
base-model release event emitted by ``python -m deployments.serve --release`` (Completed), a fleet
with a missing adapter (Failed, the good entry still published), and ``python -m deployments.serve``
next to the deployed ones (its own ``-served`` names; stopping it leaves the deployed ones active).
"""
from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deployments import local
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 128
DEPLOYED = {"migrate-adapter", "migrate-fleet-nightly", "on-base-model-release"}
NIGHTLY = "migrate-fleet/migrate-fleet-nightly"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, extra_query_heads_per_group=2,
                                                           identity_layers=(1,)))
    adapters = {f"a{i}": make_random_lora_adapter(old, root / f"a{i}", rank=4, alpha=8, seed=10 + i) for i in range(4)}

    def manifest(name: str, entries: dict[str, Path], output_root: Path) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "old_model": str(old), "new_model": str(new), "output_root": str(output_root),
            "analysis": {"max_calibration_tokens": TOKENS},
            "adapters": [{"name": n, "adapter": str(a)} for n, a in entries.items()]}))
        return path

    return {"root": root, "old": old, "new": new, "adapters": adapters, "manifest": manifest}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``python -m deployments.local up`` on a free port; yields the API URL; always torn down."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = tmp_path_factory.mktemp("stack")
    home, port = base / "home", free_port()
    patch = pytest.MonkeyPatch()
    patch.delenv("LORASUITE_CACHE_ROOT", raising=False)          # from the Prefect Variable, via the pull step
    patch.delenv("LORASUITE_PROJECT_DIR", raising=False)         # the checkout's default
    patch.setenv("LORASUITE_CACHE_DIR", str(base / "materialized"))
    patch.setenv("HF_DATASETS_CACHE", str(base / "datasets"))
    patch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    url = local.api_url(port)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "deployments.local", "up", "--home", str(home), "--port",
                               str(port), "--cache-root", str(base / "cache")],
                              cwd=ROOT, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout + done.stderr + _logs(home)
        print(f"stack up in {time.monotonic() - started:.0f} s")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield {"url": url, "home": home, "cache": base / "cache"}
    finally:
        subprocess.run([sys.executable, "-m", "deployments.local", "down", "--home", str(home)], cwd=ROOT,
                       capture_output=True, timeout=120)
        for pid_file in home.glob("*.pid"):                       # down failed: kill what it left
            local.stop(home, pid_file.stem, grace=5)
        patch.undo()


def _logs(home: Path) -> str:
    return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(home.glob("*.log")))


def run_nightly(parameters: dict | None = None, timeout: float = 300):
    from prefect.deployments import run_deployment

    return run_deployment(NIGHTLY, parameters=parameters or {}, timeout=timeout)


def wait_final(flow_run_id, timeout: float = 300):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name} after {timeout} s"
            time.sleep(2)


def runs_of(deployment_name: str):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])))


def artifacts_of(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def logs_of(flow_run_id) -> list[str]:
    """Every log line the server holds for the flow run and its task runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lines: list[str] = []
    with get_client(sync_client=True) as client:      # paged: the server returns at most its default limit per call
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=len(lines))
            lines += [log.message for log in page]
            if len(page) < 200:
                return lines


def task_runs_of(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def run_nightly_watching_progress(parameters: dict, timeout: float = 300):
    """Start the nightly deployment and poll its progress artifact until the run is final."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    started = run_deployment(NIGHTLY, parameters=parameters, timeout=0)
    seen, deadline = [], time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(started.id)
            progress = artifacts_of(started.id).get("lorasuite-fleet-progress")
            if progress is not None and (not seen or seen[-1] != (progress.data, progress.description)):
                seen.append((progress.data, progress.description))
            if run.state and run.state.is_final():
                return run, seen
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name} after {timeout} s"
            time.sleep(0.3)


def deployments_by_name() -> dict:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def assert_peft_loads(model_dir: Path, adapter_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (adapter_dir / "_LORASUITE_COMPLETE.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_documented_stack_runs_the_shipped_deployments(stack, models, tmp_path):
    from prefect.variables import Variable

    deployed = deployments_by_name()
    assert set(deployed) == DEPLOYED
    assert {d.work_pool_name for d in deployed.values()} == {local.PROCESS_POOL}
    assert deployed["migrate-fleet-nightly"].schedules[0].active

    # a base-model release, announced the documented way; runs beside the nightly runs
    release = models["manifest"]("release", {"a2": models["adapters"]["a2"]}, tmp_path / "out-release")
    emitted = subprocess.run([sys.executable, "-m", "deployments.serve", "--release", str(models["old"]),
                              str(models["new"]), str(release)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PREFECT_API_URL=stack["url"]))
    assert emitted.returncode == 0, emitted.stderr
    # finding 10: the command says which event it sent and which deployment it starts
    assert re.search(r"emitted lorasuite\.base-model\.released event [0-9a-f-]{36} to " + re.escape(stack["url"]),
                     emitted.stdout), emitted.stdout
    assert "triggers deployment(s): on-base-model-release/on-base-model-release" in emitted.stdout, emitted.stdout
    assert "EventsWorker" not in emitted.stdout + emitted.stderr

    # nothing configured: the night's run ends Completed, saying so
    empty = run_nightly()
    assert empty.state.is_completed(), empty.state
    assert "no fleet manifest configured" in empty.state.message

    # configured through the Prefect Variable: the fleet runs, adapters load in PEFT
    fleet = models["manifest"]("fleet", {n: models["adapters"][n] for n in ("a0", "a1")}, tmp_path / "out")
    Variable.set("lorasuite_fleet_manifest", str(fleet), overwrite=True)
    good, progress = run_nightly_watching_progress({})
    assert good.state.is_completed(), (good.state, _logs(stack["home"]))
    # finding 10: the progress artifact advanced during the run, then said how it ended
    assert any(0 < value < 100 for value, _ in progress), progress
    assert progress[-1][0] == 100.0 and progress[-1][1].endswith("Completed: 2 published, 0 skipped"), progress
    for name in ("a0", "a1"):
        assert_peft_loads(models["new"], tmp_path / "out" / name)
    assert any((stack["cache"] / "head_similarity").iterdir())        # the Variable's stage store
    found = artifacts_of(good.id)
    assert found["lorasuite-fleet-progress"].data == 100.0
    heads = found["lorasuite-head-mapping"].data
    assert "range [-2, 2]" in heads and "(of 2)" in heads
    rows = [line for line in heads.split("### Every new head")[1].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 * 8                                  # 4 new layers x 8 query heads, every one listed
    assert sum("new (no source)" in row for row in rows) == 8 + 3 * 4   # the inserted layer + 4 extra heads per layer

    # a fleet with a missing adapter ends Failed; its good entry is still published
    bad = models["manifest"]("bad", {"a3": models["adapters"]["a3"], "missing": tmp_path / "not-there"},
                             tmp_path / "out-bad")
    failed = run_nightly({"manifest": str(bad)})
    assert failed.state.is_failed(), failed.state
    assert "1 of 2 adapter(s) failed: missing" in failed.state.message
    # finding 6: the run's logs (read from the server) say why, with no engine traceback
    lines = logs_of(failed.id)
    assert any("1 of 2 adapter(s) failed: missing" in line for line in lines), lines
    assert not [line for line in lines if "Traceback" in line or "Engine execution exited" in line
                or "cannot be resolved into an exception" in line], lines
    # finding 7: the bad entry is a Failed task run named after it, with the reason
    runs = task_runs_of(failed.id)
    assert runs["missing"].state.is_failed() and "check:" in runs["missing"].state.message, runs["missing"].state
    assert runs["publish-a3"].state.is_completed()
    # finding 8: the pair analysis, computed by the earlier fleet run of this pair, shows as Cached
    for stage in ("vocabulary", "transfer-matrix", "activations", "cka", "layer-mapping", "head-similarity"):
        (run,) = [r for name, r in runs.items() if name.startswith(stage + "-")]
        assert run.state.name == "Cached", (stage, run.state)
    progress = artifacts_of(failed.id)["lorasuite-fleet-progress"]
    assert progress.description.endswith("Failed: 1 of 2 adapter(s) failed: missing"), progress.description
    assert_peft_loads(models["new"], tmp_path / "out-bad" / "a3")
    assert not (tmp_path / "out-bad" / "missing" / "_LORASUITE_COMPLETE.json").exists()

    # the release event's run
    deadline = time.monotonic() + 120
    while not (triggered := runs_of("on-base-model-release")):
        assert time.monotonic() < deadline, "the release event started no run" + _logs(stack["home"])
        time.sleep(2)
    (run,) = triggered
    run = wait_final(run.id)
    assert run.state.is_completed(), run.state
    assert run.parameters["fleet_manifest"] == str(release)
    assert_peft_loads(models["new"], tmp_path / "out-release" / "a2")


def test_ui_on_a_non_default_port_calls_its_own_api(stack):
    """Finding 5: ``make serve PORT=N`` (``up --port N``) serves a UI whose settings name the API on N."""
    assert not stack["url"].startswith("http://127.0.0.1:4200/")
    base = stack["url"].removesuffix("/api")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as response:
        settings = json.loads(response.read())
    assert settings["api_url"] == stack["url"], settings
    with urllib.request.urlopen(f"{base}/", timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()


def test_serve_beside_deployed_keeps_its_own_names(stack):
    """``python -m deployments.serve`` registers ``*-served``; stopping it pauses only those."""
    before = deployments_by_name()
    served = subprocess.Popen([sys.executable, "-m", "deployments.serve"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=dict(os.environ, PREFECT_API_URL=stack["url"]),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not {f"{n}-served" for n in DEPLOYED} <= set(now := deployments_by_name()):
            assert served.poll() is None, served.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "serve registered nothing"
            time.sleep(2)
    finally:
        os.killpg(served.pid, signal.SIGINT)
        try:
            served.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait()
    after = deployments_by_name()
    for name in DEPLOYED:
        assert after[name].id == before[name].id and not after[name].paused
        assert after[name].work_pool_name == local.PROCESS_POOL and after[name].pull_steps == before[name].pull_steps
    assert after["migrate-fleet-nightly"].schedules[0].active
    assert now["migrate-fleet-nightly-served"].schedules
