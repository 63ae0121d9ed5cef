"""The flow behind the scheduled fleet deployment: ``migrate-fleet`` with its manifest found at run time.

A schedule's parameters are fixed when it is deployed, so the nightly deployment passes no
manifest and this flow looks one up each night, first found wins:

1. the ``manifest`` parameter (a manual run, ``prefect deployment run ... --param manifest=...``);
2. the Prefect Variable ``lorasuite_fleet_manifest`` (``prefect variable set lorasuite_fleet_manifest
   s3://bucket/fleets/nightly.yaml``; changing it needs no redeploy);
3. ``$LORASUITE_FLEET_MANIFEST`` in the flow run's environment (worker or job variable ``env``);
4. the local file ``runs/fleets/nightly.yaml`` under the project directory, if it exists.

With none of them the run ends **Completed** with the message "no fleet manifest configured ..."
(logged as a warning): an unconfigured schedule is not an error every night.  A configured
manifest runs exactly as ``flows.migration.migrate_fleet`` (same flow name, same result, Failed
when an entry failed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, State
from prefect.variables import Variable

from flows.migration import migrate_fleet
from flows.settings import task_runner
from lorasuite_core.settings import settings

FLEET_MANIFEST_VARIABLE = "lorasuite_fleet_manifest"
FLEET_MANIFEST_ENV = "LORASUITE_FLEET_MANIFEST"
LOCAL_FLEET_MANIFEST = Path("runs") / "fleets" / "nightly.yaml"
NOT_CONFIGURED = (f"no fleet manifest configured: nothing to migrate (set the Prefect Variable {FLEET_MANIFEST_VARIABLE}, "
                  f"${FLEET_MANIFEST_ENV} on the worker, or write {LOCAL_FLEET_MANIFEST} in the project directory)")


def configured_manifest(manifest: str | None = None) -> tuple[str | None, str]:
    """``(manifest, where it came from)``; ``(None, "")`` when nothing is configured."""
    if manifest and manifest.strip():
        return manifest.strip(), "parameter"
    value = Variable.get(FLEET_MANIFEST_VARIABLE, default=None)
    if isinstance(value, str) and value.strip():
        return value.strip(), f"Prefect Variable {FLEET_MANIFEST_VARIABLE}"
    configured = (settings().fleet_manifest or "").strip()
    if configured:
        return configured, f"${FLEET_MANIFEST_ENV}"
    if LOCAL_FLEET_MANIFEST.is_file():
        return str(LOCAL_FLEET_MANIFEST.resolve()), "local file"
    return None, ""


@flow(name="migrate-fleet", task_runner=task_runner(), persist_result=False,
      description="Migrate a fleet manifest (parameter, else Prefect Variable lorasuite_fleet_manifest, "
                  "else $LORASUITE_FLEET_MANIFEST, else runs/fleets/nightly.yaml); nothing configured: a no-op.")
def migrate_fleet_nightly(manifest: str | None = None, overwrite: bool = False,
                          cache_root: str | None = None) -> dict[str, Any] | State:
    from lorasuite_core.io.uris import redact_uri

    log = get_run_logger()
    found, source = configured_manifest(manifest)
    if found is None:
        log.warning(NOT_CONFIGURED)
        return Completed(message=NOT_CONFIGURED, data={"note": NOT_CONFIGURED})
    log.info("fleet manifest %s (%s)", redact_uri(found), source)
    return migrate_fleet.fn(found, overwrite=overwrite, cache_root=cache_root)
