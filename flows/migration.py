"""The three flows: one adapter, a fleet of one model pair, and a base-model release event.

* ``migrate-adapter`` — one adapter across one upgrade, optional LFT / evaluation.  Checked
  before any work: the output may not be an input, inside or above one, or the working
  directory; an earlier publication of ours is replaced only with ``overwrite`` (one cut
  short by a crash is replaced on a plain rerun); anything else there is refused.
* ``migrate-fleet`` — a fleet manifest (YAML/JSON, local path or URI): the pair analysis runs
  once, every adapter fans out.  Entries fail independently and the result lists which failed
  and why, and the run ends Failed when any entry failed (the others are still published): the
  message names them, each failed entry is a Failed task run named after it, and the state's data
  is a :class:`RunFailed` carrying the summary; a user error of the whole run (a bad manifest)
  ends Failed with its one line too.  Neither logs an engine traceback
  (:class:`_ReportedFailureFilter`).  An entry whose output already holds a finished, verified
  publication is skipped, so a scheduled rerun only does what is missing.  A progress artifact
  follows the analysis and the entries and ends saying Completed or Failed.
* ``on-base-model-release`` — a new base model supersedes ``previous_model``: if the fleet
  manifest's adapters were trained on ``previous_model``, migrate all of them to
  ``new_model`` (outputs under ``output_root`` if given, else the manifest's); otherwise do
  nothing.  Meant to be triggered by an event (see ``deployments/``).

All three store stage results under ``cache_root`` (default ``$LORASUITE_CACHE_ROOT`` or
``~/.cache/lorasuite/pipeline``) and reuse what is there; bad input raises
:class:`~lorasuite_core.errors.LorasuiteError`.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import BaseModelRelease, FleetManifest, ManifestError
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.io.outputs import check_not_a_file
from lorasuite_core.io.uris import redact_uri
import tasks
from tasks._support import forward_core_logs

from . import artifacts
from .pipeline import EntryRun, FleetResult, PipelineRun
from .settings import task_runner


class RunFailed(LorasuiteError):
    """Why a fleet or release run ended Failed; :attr:`summary` is the fleet summary (None: no entry ran).

    It is the Failed state's data, so the CLI gets the summary back, and what the engine re-raises
    at the end of a worker's run (see :class:`_ReportedFailureFilter`)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):
        return (self.__class__, (str(self), self.summary))


class _ReportedFailureFilter(logging.Filter):
    """Drop Prefect's "Engine execution exited with unexpected exception" record (and the engine's own
    "Execution of flow run ... exited with unexpected exception") when the exception is a LorasuiteError.

    A worker's engine re-raises the final state's exception after the run ended Failed, and logs it
    with a traceback: for a user error (a bad fleet entry, a missing manifest) whose one-line reason is
    already the state's message, the summary artifact and the failed entry's task run, that traceback
    only reads as a crash.  Bugs (any other exception) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, LorasuiteError) and "exited with unexpected exception" in record.getMessage())


_FILTER = _ReportedFailureFilter()
for _name in ("prefect.flow_runs", "prefect.engine"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


def _failed(error: LorasuiteError, summary: dict[str, Any] | None = None) -> State:
    """The run's Failed state: the one-line reason as its message, no traceback."""
    message = " ".join(str(error).split())
    get_run_logger().error("run failed: %s", message)
    return Failed(message=message, data=error if isinstance(error, RunFailed) else RunFailed(message, summary))


def _entry_name(output: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", output.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return name or "adapter"


@flow(name="migrate-adapter", description="Migrate one LoRA adapter to an upgraded base model.",
      task_runner=task_runner(), persist_result=False)
def migrate_adapter(
    old_model: str,
    new_model: str,
    adapter: str,
    output: str,
    options: MigrationOptions | None = None,
    analysis: AnalysisOptions | None = None,
    overwrite: bool = False,
    cache_root: str | None = None,
) -> dict[str, Any]:
    """Returns the migration summary (output, layer mapping, steps, evaluation).

    ``options`` (per adapter) and ``analysis`` (the pair analysis) are the one options schema
    (:mod:`lorasuite_core.pipeline.options`); the Prefect UI shows them as forms."""
    forward_core_logs()
    options = (options or MigrationOptions()).check_single()
    analysis = analysis or AnalysisOptions()
    run = PipelineRun(cache_root)
    entry = EntryRun(name=_entry_name(output), adapter=adapter, output=output, options=options)
    pair = run.run(old_model, new_model, analysis, [entry], overwrite=overwrite)   # checked before any analysis
    if entry.status != "published":
        raise entry.exception or LorasuiteError(f"adapter {entry.name}: {entry.error}")
    return run.result(entry, run.summary(entry, pair)).model_dump()


def run_fleet(fleet: FleetManifest, *, overwrite: bool, cache_root: str | None) -> FleetResult:
    """The fleet migration proper (inside a flow run): outputs checked, analysis once, entries fanned out."""
    log = get_run_logger()
    run = PipelineRun(cache_root)
    entries = [EntryRun(name=e.name, adapter=e.adapter, output=fleet.output_uri(e), options=fleet.effective_options(e))
               for e in fleet.adapters]
    progress = artifacts.ProgressArtifact(
        f"{len(entries)} adapter(s), {artifacts.pair_title(fleet.old_model, fleet.new_model)}")
    try:
        check_not_a_file(fleet.output_root, "fleet output_root")
        pair = run.run(fleet.old_model, fleet.new_model, fleet.analysis, entries, overwrite=overwrite,
                       skip_finished=True, progress=progress)   # every entry checked before the pair analysis
    except BaseException as error:
        progress.finish(f"Failed: {artifacts.one_line(error)}")
        raise
    for e in entries:                    # each failed entry a Failed task run named after it, in the graph
        if e.status == "failed":
            tasks.entry_failed(e.name, e.error or "", return_state=True)
    result = FleetResult(old_model=fleet.old_model, new_model=fleet.new_model, analysis=pair.steps() if pair else {},
                         entries=[run.result(e, run.summary(e, pair)) for e in entries])
    summary = result.summary()
    progress.finish(fleet_message(summary))
    artifacts.fleet_summary_artifact(summary["entries"])
    log.info("fleet: %d published, %d skipped, %d failed", len(summary["published"]), len(summary["skipped"]),
             len(summary["failed"]))
    return result


@flow(name="migrate-fleet", description="Migrate every adapter of a fleet manifest; the pair analysis runs once.",
      task_runner=task_runner(), persist_result=False)
def migrate_fleet(manifest: str, overwrite: bool = False, cache_root: str | None = None) -> dict[str, Any]:
    """Returns the fleet summary: published / skipped / failed (with reasons) and per-entry summaries.

    With any failed entry the run ends Failed (the summary is the state's data, the others are published)."""
    forward_core_logs()
    try:
        fleet = FleetManifest.load(manifest)
        return fleet_outcome(run_fleet(fleet, overwrite=overwrite, cache_root=cache_root).summary())
    except LorasuiteError as error:
        return _failed(error)


def fleet_message(summary: dict[str, Any]) -> str:
    """One line: ``Completed: N published, M skipped`` or ``Failed: k of n adapter(s) failed: names``."""
    failed = summary["failed"]
    if not failed:
        return f"Completed: {len(summary['published'])} published, {len(summary['skipped'])} skipped"
    names = ", ".join(f["name"] for f in failed[:5]) + (", ..." if len(failed) > 5 else "")
    return f"Failed: {len(failed)} of {len(summary['entries'])} adapter(s) failed: {names}"


def fleet_outcome(summary: dict[str, Any]) -> dict[str, Any] | State:
    """The summary, or a Failed state carrying it (as :class:`RunFailed`) when any entry failed: red in the
    UI, the reason as the message, and no engine traceback (:class:`_ReportedFailureFilter`)."""
    if not summary["failed"]:
        return summary
    return _failed(RunFailed(fleet_message(summary).removeprefix("Failed: "), summary), summary)


def same_reference(a: str, b: str) -> bool:
    """Two model references name the same thing (trailing slashes, ``~`` and ``.`` segments ignored)."""
    def norm(ref: str) -> str:
        ref = ref.strip().rstrip("/")
        return ref if "://" in ref else os.path.normpath(os.path.expanduser(ref))
    return norm(a) == norm(b)


@flow(name="on-base-model-release", task_runner=task_runner(), persist_result=False,
      description="A new base model was released: migrate every fleet adapter trained on its predecessor.")
def on_base_model_release(previous_model: str, new_model: str, fleet_manifest: str, output_root: str | None = None,
                          overwrite: bool = False, cache_root: str | None = None) -> dict[str, Any]:
    forward_core_logs()
    try:
        return _release(previous_model, new_model, fleet_manifest, output_root, overwrite, cache_root)
    except LorasuiteError as error:
        return _failed(error)


def _release(previous_model: str, new_model: str, fleet_manifest: str, output_root: str | None,
             overwrite: bool, cache_root: str | None) -> dict[str, Any] | State:
    log = get_run_logger()
    try:
        release = BaseModelRelease(previous_model=previous_model, new_model=new_model, fleet_manifest=fleet_manifest)
    except ValueError as error:
        raise ManifestError(f"invalid release event: {' '.join(str(error).split())}") from None
    fleet = FleetManifest.load(release.fleet_manifest)
    if not same_reference(fleet.old_model, release.previous_model):
        note = (f"fleet {redact_uri(release.fleet_manifest)} holds adapters of {redact_uri(fleet.old_model)}, "
                f"not of {redact_uri(release.previous_model)}: nothing to migrate")
        log.info(note)
        return FleetResult(old_model=release.previous_model, new_model=release.new_model, note=note).summary()
    update = {"new_model": release.new_model, **({"output_root": output_root} if output_root else {})}
    try:
        fleet = FleetManifest.model_validate({**fleet.model_dump(), **update})
    except ValueError as error:
        raise ManifestError(f"release of {redact_uri(release.new_model)}: {error}") from None
    log.info("release: migrating %d adapter(s) from %s to %s", len(fleet.adapters), redact_uri(fleet.old_model),
             redact_uri(fleet.new_model))
    return fleet_outcome(run_fleet(fleet, overwrite=overwrite, cache_root=cache_root).summary())
