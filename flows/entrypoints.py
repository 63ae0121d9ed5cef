"""Plain-Python entry points for the CLI: ``lorasuite migrate`` and ``lorasuite migrate-fleet``.

They validate the arguments first (a bad value is a :class:`~lorasuite_core.errors.LorasuiteError`
before any flow run is created), then call the flow.  With no Prefect server configured the
flow runs against a private API server started for the run (:mod:`flows.embedded`); with
``PREFECT_API_URL`` set it reports to that server.  User errors (bad input, missing files, an adapter of another model, unreachable
storage after retries) surface as ``LorasuiteError``: the CLI prints one line and exits 2.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import FleetManifest
from lorasuite_core.pipeline.stages import EntryOptions, check_adapter, output_status, run_inputs
from lorasuite_core.io.storage import check_not_a_file, check_replaceable

from .embedded import embedded_api


def run_migrate_adapter(
    old_model: str,
    new_model: str,
    adapter: str,
    output: str,
    *,
    lft: bool = False,
    lft_data: str | None = None,
    lft_samples: int = 100,
    lft_lr: float = 9e-4,
    lft_epochs: int = 1,
    eval_data: str | None = None,
    eval_samples: int | None = None,
    vanilla_baseline: bool = False,
    head_transform: str = "lstsq",
    calibration_data: str | None = None,
    max_calibration_tokens: int = 2048,
    layer_offset: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    cache_root: str | None = None,
) -> dict[str, Any]:
    """Run the ``migrate-adapter`` flow; returns its summary (output, mapping, steps, evaluation)."""
    from .migration import migrate_adapter

    options = _check_options(head_transform=head_transform, lft=lft, lft_data=lft_data, lft_samples=lft_samples,
                             lft_lr=lft_lr, lft_epochs=lft_epochs, eval_data=eval_data, eval_samples=eval_samples,
                             vanilla_baseline=vanilla_baseline, seed=seed)
    if max_calibration_tokens < 8:
        raise LorasuiteError(f"--max-calibration-tokens must be at least 8, not {max_calibration_tokens}")
    if layer_offset is not None and layer_offset < 0:
        raise LorasuiteError(f"--layer-offset must be >= 0, not {layer_offset}")
    # The flow checks again (deployments call it directly); here the error comes before any run starts.
    inputs = run_inputs(str(old_model), str(new_model), str(adapter), options, calibration_data, cache_root)
    check_replaceable(str(output), output_status(str(output), inputs), overwrite)
    check_adapter(str(old_model), str(adapter))
    with embedded_api():
        return migrate_adapter(
            old_model=str(old_model), new_model=str(new_model), adapter=str(adapter), output=str(output), lft=lft,
            lft_data=lft_data, lft_samples=lft_samples, lft_lr=lft_lr, lft_epochs=lft_epochs, eval_data=eval_data,
            eval_samples=eval_samples, vanilla_baseline=vanilla_baseline, head_transform=head_transform,
            calibration_data=calibration_data, max_calibration_tokens=max_calibration_tokens,
            layer_offset=layer_offset, seed=seed, overwrite=overwrite, cache_root=cache_root,
        )


def run_migrate_fleet(manifest_uri: str, *, overwrite: bool = False, cache_root: str | None = None) -> dict[str, Any]:
    """Run the ``migrate-fleet`` flow; returns the fleet summary (``published``, ``skipped``, ``failed``...).

    A malformed manifest raises ManifestError (a LorasuiteError naming the field) before any run.
    Failed entries do not raise: they are listed under ``failed`` with the reason.
    """
    from .migration import migrate_fleet

    fleet = FleetManifest.load(str(manifest_uri))
    check_not_a_file(fleet.output_root, "fleet output_root")
    with embedded_api():
        state = migrate_fleet(manifest=str(manifest_uri), overwrite=overwrite, cache_root=cache_root,
                              return_state=True)
    result = state.result(raise_on_failure=False)   # a Failed fleet carries its summary as data
    if isinstance(result, BaseException):
        raise result
    return result


def _check_options(**values: Any) -> EntryOptions:
    try:
        options = EntryOptions(**values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))
        raise LorasuiteError(f"invalid migration options: {problems}") from None
    for name in ("lft_samples", "lft_epochs"):
        if values[name] < 1:
            raise LorasuiteError(f"--{name.replace('_', '-')} must be at least 1, not {values[name]}")
    if values["lft_lr"] <= 0:
        raise LorasuiteError(f"--lft-lr must be positive, not {values['lft_lr']}")
    return options
