"""Deployment definitions: the served deployments and prefect.yaml point at the real flows."""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_served_deployments():
    from deployments.serve import RELEASE_EVENT, build_deployments

    deployments = {d.name: d for d in build_deployments("s3://bucket/fleet.yaml")}
    assert set(deployments) == {"migrate-adapter", "migrate-fleet-nightly", "on-base-model-release"}
    fleet = deployments["migrate-fleet-nightly"]
    assert fleet.parameters == {"manifest": "s3://bucket/fleet.yaml"}
    assert fleet.schedules and fleet.schedules[0].schedule.cron == "0 2 * * *"
    (trigger,) = deployments["on-base-model-release"].triggers
    assert RELEASE_EVENT in trigger.expect
    assert set(trigger.parameters) == {"previous_model", "new_model", "fleet_manifest"}


def test_prefect_yaml_entrypoints_and_parameters_match_the_flows():
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        accepted = set(flow.parameters.properties)
        given = set(deployment.get("parameters", {}))
        for trigger in deployment.get("triggers", []):
            given |= set(trigger["parameters"])
        assert given <= accepted, (deployment["name"], given - accepted)
        assert deployment["work_pool"]["name"].startswith("lorasuite-")
