"""Plain-Python entry points for the CLI: ``lorasuite migrate`` and ``lorasuite migrate-fleet``.

They validate the arguments first (a bad value is a :class:`~lorasuite_core.errors.LorasuiteError`
before any flow run is created), then call the flow.  With no Prefect server configured the
flow runs against a private API server started for the run (:mod:`flows.embedded`); with
``PREFECT_API_URL`` set it reports to that server.  User errors (bad input, missing files, an adapter of another model, unreachable
storage after retries) surface as ``LorasuiteError``: the CLI prints one line and exits 2.
"""
from __future__ import annotations

from typing import Any

from lorasuite_core.pipeline.manifest import FleetManifest
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import check_entry
from lorasuite_core.io.outputs import check_not_a_file

from .embedded import embedded_api
from .settings import resolve_cache_root


def run_migrate_adapter(old_model: str, new_model: str, adapter: str, output: str,
                        options: MigrationOptions | None = None, analysis: AnalysisOptions | None = None, *,
                        overwrite: bool = False, cache_root: str | None = None) -> dict[str, Any]:
    """Run the ``migrate-adapter`` flow; returns its summary (output, mapping, steps, evaluation)."""
    from .migration import migrate_adapter

    options = (options or MigrationOptions()).check_single()
    analysis = analysis or AnalysisOptions()
    # The flow checks again (deployments call it directly); here the error comes before any run starts.
    old_model, new_model, adapter, output = map(str, (old_model, new_model, adapter, output))
    check_entry(old_model, new_model, analysis, adapter, output, options, resolve_cache_root(cache_root),
                overwrite=overwrite)
    with embedded_api():
        return migrate_adapter(old_model=old_model, new_model=new_model, adapter=adapter, output=output,
                               options=options, analysis=analysis, overwrite=overwrite, cache_root=cache_root)


def run_migrate_fleet(manifest_uri: str, *, overwrite: bool = False, cache_root: str | None = None) -> dict[str, Any]:
    """Run the ``migrate-fleet`` flow; returns the fleet summary (``published``, ``skipped``, ``failed``...).

    A malformed manifest raises ManifestError (a LorasuiteError naming the field) before any run.
    Failed entries do not raise: they are listed under ``failed`` with the reason.
    """
    from .migration import RunFailed, migrate_fleet

    fleet = FleetManifest.load(str(manifest_uri))
    check_not_a_file(fleet.output_root, "fleet output_root")
    with embedded_api():
        state = migrate_fleet(manifest=str(manifest_uri), overwrite=overwrite, cache_root=cache_root,
                              return_state=True)
    result = state.result(raise_on_failure=False)   # a Failed fleet carries RunFailed, with its summary
    if isinstance(result, RunFailed) and result.summary is not None:
        return result.summary
    if isinstance(result, BaseException):
        raise result
    return result
