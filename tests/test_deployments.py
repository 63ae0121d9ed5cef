"""Deployment definitions, the pull step and the task runner choice (no server), and fleet progress.

The served deployments and prefect.yaml point at the real flows and never share a name; the pull
step resolves the project directory and stage store as documented; ``task_runner()`` follows
``PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS`` and ``LORASUITE_TASK_RUNNER``; a fleet's progress
artifact advances through the pair-analysis stages (a real fleet run on the session's test server).
The deployments on a real server: tests/test_server_deployments.py.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorasuite_core.errors import LorasuiteError

ROOT = Path(__file__).resolve().parents[1]


def shipped() -> dict:
    return yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def test_served_deployments():
    from deployments.serve import RELEASE_EVENT, SERVED_SUFFIX, build_deployments

    deployments = {d.name: d for d in build_deployments("s3://bucket/fleet.yaml")}
    names = {"migrate-adapter", "migrate-fleet-nightly", "on-base-model-release"}
    assert set(deployments) == {name + SERVED_SUFFIX for name in names}
    assert not set(deployments) & {d["name"] for d in shipped()["deployments"]}    # never the deployed names
    fleet = deployments["migrate-fleet-nightly-served"]
    assert fleet.parameters == {"manifest": "s3://bucket/fleet.yaml"}
    assert fleet.schedules and fleet.schedules[0].schedule.cron == "0 2 * * *"
    (trigger,) = deployments["on-base-model-release-served"].triggers
    assert RELEASE_EVENT in trigger.expect
    assert set(trigger.parameters) == {"previous_model", "new_model", "fleet_manifest"}
    unconfigured = {d.name: d for d in build_deployments()}["migrate-fleet-nightly-served"]
    assert unconfigured.parameters == {}          # the manifest is looked up at run time


def test_prefect_yaml_entrypoints_and_parameters_match_the_flows():
    config = shipped()
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        accepted = set(flow.parameters.properties)
        given = set(deployment.get("parameters", {}))
        for trigger in deployment.get("triggers", []):
            given |= set(trigger["parameters"])
        assert given <= accepted, (deployment["name"], given - accepted)
        assert deployment["work_pool"]["name"] == "lorasuite-process"      # the GPU pool is opt-in
        assert set(flow.parameters.required) <= given | {"old_model", "new_model", "adapter", "output"}
    text = (ROOT / "deployments" / "prefect.yaml").read_text()
    assert "my-bucket" not in text and "/opt/lorasuite" not in text.split("\nname:")[1]
    ((step, inputs),) = config["pull"][0].items()
    assert step == "deployments.steps.prepare_project"
    assert inputs["directory"] == "{{ $LORASUITE_PROJECT_DIR }}"
    assert inputs["cache_root"] == "{{ prefect.variables.lorasuite_cache_root }}"


def test_pull_step_directory_and_stage_store(tmp_path, monkeypatch):
    from deployments import steps

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORASUITE_CACHE_ROOT", raising=False)
    # unresolved templates: a missing variable is "", a missing environment variable drops the argument
    out = steps.prepare_project(variable_directory="", cache_root=str(tmp_path / "store"))
    assert Path(out["directory"]) == ROOT and Path.cwd() == ROOT
    assert os.environ["LORASUITE_CACHE_ROOT"] == out["cache_root"] == str(tmp_path / "store")
    # the worker's environment (or a job variable) wins over the Prefect Variable
    monkeypatch.setenv("LORASUITE_CACHE_ROOT", "s3://bucket/cache")
    assert steps.prepare_project(str(ROOT), cache_root="s3://other/cache")["cache_root"] == "s3://bucket/cache"
    with pytest.raises(LorasuiteError, match="holds no flows/migration.py: set LORASUITE_PROJECT_DIR"):
        steps.prepare_project(directory=str(tmp_path))
    with pytest.raises(LorasuiteError, match="lorasuite_project_dir"):
        steps.prepare_project(variable_directory=str(tmp_path / "absent"))


def describe(runner) -> str:
    return f"{type(runner).__name__} {getattr(runner, '_max_workers', None)} {getattr(runner, 'address', None)}"


def test_task_runner_respects_prefect_setting_and_ray(monkeypatch):
    from prefect.settings import PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS, temporary_settings

    from flows.settings import task_runner

    for name in ("LORASUITE_MAX_PARALLEL_TASKS", "LORASUITE_TASK_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    with temporary_settings(updates={PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS: 7}):
        assert describe(task_runner()) == "ThreadPoolTaskRunner 7 None"
        monkeypatch.setenv("LORASUITE_MAX_PARALLEL_TASKS", "2")
        assert describe(task_runner()) == "ThreadPoolTaskRunner 7 None"     # Prefect's setting wins
    with temporary_settings(restore_defaults={PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS}):
        assert describe(task_runner()) == "ThreadPoolTaskRunner 2 None"
        monkeypatch.delenv("LORASUITE_MAX_PARALLEL_TASKS")
        default = max(1, (os.cpu_count() or 1) // __import__("torch").get_num_threads())
        assert describe(task_runner()) == f"ThreadPoolTaskRunner {default} None"
        monkeypatch.setenv("LORASUITE_TASK_RUNNER", "ray:ray://head:10001")
        assert describe(task_runner()) == "RayTaskRunner None ray://head:10001"
        monkeypatch.setenv("LORASUITE_TASK_RUNNER", "ray")
        assert describe(task_runner()) == "RayTaskRunner None None"
        monkeypatch.setenv("LORASUITE_TASK_RUNNER", "dask")
        with pytest.raises(LorasuiteError, match="must be 'threads', 'ray' or 'ray:ADDRESS', not 'dask'"):
            task_runner()


def test_flows_take_the_thread_pool_size_from_prefects_environment_variable():
    """The documented environment variable, read by a fresh process that imports the flows."""
    code = "from flows.migration import migrate_fleet as f\nprint(f.task_runner._max_workers)"
    env = {k: v for k, v in os.environ.items() if k not in ("LORASUITE_MAX_PARALLEL_TASKS", "LORASUITE_TASK_RUNNER")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**env, "PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS": "5"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "5"


def test_fleet_progress_advances_through_the_analysis(prefect_server, tmp_path, monkeypatch):
    """A real fleet run: the progress artifact takes 40/n % per finished analysis stage (n pair stages), then
    the entries."""
    from flows import artifacts
    from lorasuite_core.pipeline.graph import PAIR_STAGES
    from flows.migration import migrate_fleet
    from lorasuite_core.testing.adapter import make_random_lora_adapter
    from lorasuite_core.testing.model import make_tiny_model_dir
    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    old = make_tiny_model_dir("llama", tmp_path / "old", seed=3)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(permute_heads=True))
    adapter = make_random_lora_adapter(old, tmp_path / "a", rank=2, alpha=4, seed=1)
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(yaml.safe_dump({"old_model": str(old), "new_model": str(new), "output_root": str(tmp_path / "out"),
                                        "analysis": {"max_calibration_tokens": 64},
                                        "adapters": [{"name": "a", "adapter": str(adapter)}]}))
    seen: list[float] = []
    said: list[str | None] = []
    original = artifacts.update_progress_artifact
    monkeypatch.setattr(artifacts, "update_progress_artifact",
                        lambda id, p, description=None: (seen.append(p), said.append(description),
                                                         original(id, p, description))[2])
    summary = migrate_fleet(str(manifest), cache_root=str(tmp_path / "cache"))
    assert summary["published"] == ["a"]
    n = len(PAIR_STAGES)                                                        # 7 with unit_maps
    assert seen[:n] == [round(40 * k / n, 1) for k in range(1, n + 1)]
    assert seen == sorted(seen) and seen[n] > 40 and seen[-1] == 100.0
    assert said[0].endswith(f"pair analysis: 1/{n} stages") and said[-1].endswith("Completed: 1 published, 0 skipped")
