"""Deployments of the three flows, served from this process — no work pool needed.

    python -m deployments.serve                 # serve until interrupted (needs a Prefect API)
    python -m deployments.serve --release OLD NEW MANIFEST   # emit a base-model release event

Served deployments are named with the suffix ``-served`` (:data:`SERVED_SUFFIX`), so they never
take over the work-pool deployments of ``deployments/prefect.yaml`` (``migrate-adapter``, ...):
both can live on one server.  When ``serve`` stops, Prefect pauses *its* deployments (schedule
included); the deployed ones are untouched.

* ``migrate-adapter-served``: on demand (UI "Run", ``prefect deployment run``), parameters as the flow's.
* ``migrate-fleet-nightly-served``: the batch fleet migration (``deployments/nightly.py``: manifest
  from ``--fleet-manifest``, else the Prefect Variable ``lorasuite_fleet_manifest``, else
  ``$LORASUITE_FLEET_MANIFEST``; none: the run completes with "no fleet manifest configured"), on
  a cron schedule (02:00 UTC), one run at a time; reruns skip adapters already published.  Next
  to the deployed nightly run it only repeats it (the second finds everything published).
* ``on-base-model-release-served``: triggered by the event ``lorasuite.base-model.released`` whose
  payload names ``previous_model``, ``new_model`` and ``fleet_manifest`` (see :func:`emit_release`).
  With the deployed one too, both start a run per event; the second skips what the first published.

The stage store comes from ``LORASUITE_CACHE_ROOT`` in the serving environment (or the
``cache_root`` parameter); credentials for object storage from the usual AWS environment,
never from parameters.
"""
from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from deployments.nightly import FLEET_MANIFEST_ENV, migrate_fleet_nightly
from flows.migration import migrate_adapter, on_base_model_release

RELEASE_EVENT = "lorasuite.base-model.released"
SERVED_SUFFIX = "-served"


def build_deployments(fleet_manifest: str | None = None) -> list:
    """The served deployments; the nightly one gets ``fleet_manifest`` as its parameter when given."""
    return [
        migrate_adapter.to_deployment(name="migrate-adapter" + SERVED_SUFFIX, tags=["lorasuite"],
                                      description="Migrate one LoRA adapter (parameters as the flow's)."),
        migrate_fleet_nightly.to_deployment(
            name="migrate-fleet-nightly" + SERVED_SUFFIX, tags=["lorasuite", "batch"],
            parameters={"manifest": fleet_manifest} if fleet_manifest else {},
            schedule=Cron("0 2 * * *", timezone="UTC"), concurrency_limit=1,
            description="Nightly batch migration of a fleet; published adapters are skipped."),
        on_base_model_release.to_deployment(
            name="on-base-model-release" + SERVED_SUFFIX, tags=["lorasuite", "event"],
            triggers=[DeploymentEventTrigger(
                expect={RELEASE_EVENT},
                parameters={"previous_model": "{{ event.payload.previous_model }}",
                            "new_model": "{{ event.payload.new_model }}",
                            "fleet_manifest": "{{ event.payload.fleet_manifest }}"})],
            description="Migrate every fleet adapter trained on the released model's predecessor."),
    ]


def emit_release(previous_model: str, new_model: str, fleet_manifest: str):
    """Announce a base-model release (what a model registry webhook would do); returns the Event sent.

    Sent through an events client that is closed (flushed) before returning, not Prefect's background
    EventsWorker, which can still hold the event when a short-lived process exits."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    event = Event(event=RELEASE_EVENT, resource={"prefect.resource.id": f"lorasuite.base-model.{new_model}"},
                  payload={"previous_model": previous_model, "new_model": new_model, "fleet_manifest": fleet_manifest})

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)
    run_coro_as_sync(send())
    return event


def release_targets() -> list[str]:
    """``flow/deployment`` names of the enabled deployments whose triggers expect :data:`RELEASE_EVENT`."""
    from prefect import get_client

    targets = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if not automation.enabled or RELEASE_EVENT not in (getattr(automation.trigger, "expect", None) or ()):
                continue
            for action in automation.actions:
                if getattr(action, "type", None) == "run-deployment" and getattr(action, "deployment_id", None):
                    deployment = client.read_deployment(action.deployment_id)
                    targets.append(f"{client.read_flow(deployment.flow_id).name}/{deployment.name}")
    return sorted(set(targets))


def release(previous_model: str, new_model: str, fleet_manifest: str) -> int:
    """``--release``: emit the event, then print its id and the deployments it triggers (one line each)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("lorasuite: error: PREFECT_API_URL is not set: no server would receive the event (make serve "
              "prints the address to export)", file=sys.stderr)
        return 2
    event = emit_release(previous_model, new_model, fleet_manifest)
    targets = release_targets()
    print(f"lorasuite: emitted {RELEASE_EVENT} event {event.id} to {PREFECT_API_URL.value()}")
    if targets:
        print(f"lorasuite: it triggers deployment(s): {', '.join(targets)}")
    else:
        print("lorasuite: warning: no deployment listens to this event (make serve deploys "
              "on-base-model-release)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--fleet-manifest", help="manifest of the nightly fleet run (default: Prefect Variable "
                        f"lorasuite_fleet_manifest, else ${FLEET_MANIFEST_ENV} at run time)")
    parser.add_argument("--release", nargs=3, metavar=("PREVIOUS_MODEL", "NEW_MODEL", "FLEET_MANIFEST"),
                        help="emit a base-model release event instead of serving")
    args = parser.parse_args(argv)
    if args.release:
        return release(*args.release)
    serve(*build_deployments(args.fleet_manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
