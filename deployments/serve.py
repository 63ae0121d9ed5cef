"""Deployments of the three flows, served from this process — no work pool needed.

    python -m deployments.serve                 # serve until interrupted (needs a Prefect API)
    python -m deployments.serve --release OLD NEW MANIFEST   # emit a base-model release event

* ``migrate-adapter``: on demand (UI "Run", ``prefect deployment run``), parameters as the flow's.
* ``migrate-fleet-nightly``: the batch fleet migration, on a cron schedule (02:00 UTC), one run
  at a time; reruns skip adapters already published, so the schedule only does what is missing.
* ``on-base-model-release``: triggered by the event ``lorasuite.base-model.released`` whose payload
  names ``previous_model``, ``new_model`` and ``fleet_manifest`` (see :func:`emit_release`).

For work pools (process by default, a GPU pool for accelerators) use ``deployments/prefect.yaml``.
The stage store comes from ``LORASUITE_CACHE_ROOT`` in the serving environment (or the
``cache_root`` parameter); credentials for object storage from the usual AWS environment,
never from parameters.
"""
from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.migration import migrate_adapter, migrate_fleet, on_base_model_release

RELEASE_EVENT = "lorasuite.base-model.released"
FLEET_MANIFEST_ENV = "LORASUITE_FLEET_MANIFEST"


def build_deployments(fleet_manifest: str | None = None) -> list:
    manifest = fleet_manifest or os.environ.get(FLEET_MANIFEST_ENV, "s3://my-bucket/lorasuite/fleets/fleet.yaml")
    return [
        migrate_adapter.to_deployment(name="migrate-adapter", tags=["lorasuite"],
                                      description="Migrate one LoRA adapter (parameters as the flow's)."),
        migrate_fleet.to_deployment(
            name="migrate-fleet-nightly", tags=["lorasuite", "batch"], parameters={"manifest": manifest},
            schedule=Cron("0 2 * * *", timezone="UTC"), concurrency_limit=1,
            description="Nightly batch migration of a fleet; published adapters are skipped."),
        on_base_model_release.to_deployment(
            name="on-base-model-release", tags=["lorasuite", "event"],
            triggers=[DeploymentEventTrigger(
                expect={RELEASE_EVENT},
                parameters={"previous_model": "{{ event.payload.previous_model }}",
                            "new_model": "{{ event.payload.new_model }}",
                            "fleet_manifest": "{{ event.payload.fleet_manifest }}"})],
            description="Migrate every fleet adapter trained on the released model's predecessor."),
    ]


def emit_release(previous_model: str, new_model: str, fleet_manifest: str):
    """Announce a base-model release (what a model registry webhook would do)."""
    from prefect.events import emit_event

    return emit_event(event=RELEASE_EVENT, resource={"prefect.resource.id": f"lorasuite.base-model.{new_model}"},
                      payload={"previous_model": previous_model, "new_model": new_model,
                               "fleet_manifest": fleet_manifest})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--fleet-manifest", help=f"manifest of the nightly fleet run (default ${FLEET_MANIFEST_ENV})")
    parser.add_argument("--release", nargs=3, metavar=("PREVIOUS_MODEL", "NEW_MODEL", "FLEET_MANIFEST"),
                        help="emit a base-model release event instead of serving")
    args = parser.parse_args(argv)
    if args.release:
        emit_release(*args.release)
        return
    serve(*build_deployments(args.fleet_manifest))


if __name__ == "__main__":
    main()
