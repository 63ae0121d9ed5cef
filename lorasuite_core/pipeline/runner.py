"""The one runner: the pair graph once, then the entry graph for every adapter, on an executor.

Design
------
:class:`Runner` walks :data:`~lorasuite_core.pipeline.graph.PAIR_GRAPH` and
:data:`~lorasuite_core.pipeline.graph.ENTRY_GRAPH` (the stage order lives in :mod:`.graph`)
through an :class:`Executor`, which starts one call and later hands back its result:

* :class:`InProcess` calls the stage functions here, one after the other (``migrate_in_process``:
  the synthetic demo, benchmarks, the tests' references);
* ``flows.pipeline.PrefectExecutor`` submits the Prefect tasks generated from the same table.

An entry goes: :func:`check_entry` (the one pre-run check: the output is safe to write and not
finished already, the adapter loads and fits the old model), ``plan_adapter``, the entry graph
level by level, ``publish`` of :data:`~lorasuite_core.pipeline.graph.FINAL`.  Each of these waves
starts the work of every live entry before waiting on any, so entries (and their layers) run side
by side.  A failure fails only its entry, recorded as ``"<stage>: <message>"`` with the original
exception; a batched stage (``teacher``, ``eval``: graph docstring) is one call for the level's entries (or rows) that
run it, each collecting its own result or error from it; the pair analysis is submitted as a whole (its branches run side by side) and a failure
there raises, since no adapter can move without it.

Report ``steps``: per stage ``{"cache": "computed" | "reused", "seconds"}``
(:func:`~lorasuite_core.pipeline.graph.step`): reused means a complete, verified store entry
found by the stage itself; seconds are the time spent inside the stage in this run, per-layer and
per-row parts summed; orchestration overhead is not counted.  Progress (``on_progress``) is the
share of each entry's planned waves done, from the graph and the entry's plan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io.files import read_json
from lorasuite_core.io.outputs import check_output
from lorasuite_core.io.uris import describe_error, is_remote, join_uri, redact_uri, resolve

from . import plans, stages
from .memory_check import check_memory
from .graph import ENTRY_GRAPH, FINAL, PAIR_GRAPH, Stage, as_uris, levels, resolve_input, step
from .options import AnalysisOptions, MigrationOptions
from .stage_store import StageResult, StageStore
from .plans import AdapterPlan, PairPlan
from .stages import REPORT_NAME


# --------------------------------------------------------------------------- the one pre-run check


def check_entry(old_model: str, new_model: str, analysis: AnalysisOptions, adapter: str, output: str,
                options: MigrationOptions, cache_root: str, *, overwrite: bool, skip_finished: bool = False) -> bool:
    """Before any analysis: the output may not be an input (or inside / above one, or the working
    directory); foreign content there is refused; an earlier publication of ours is replaced only
    with ``overwrite`` (one cut short by a crash, or no longer matching its manifest, on a plain rerun);
    the adapter loads and fits the old model (and is not DoRA when ``options.serving`` is ``vllm``); the route
    can be taken (:func:`~lorasuite_core.pipeline.routes.check_route`: ``copy`` only with the same shapes and
    vocabulary); seed prompts to synthesise from include a question; the stages that load whole models fit in the
    available memory (:mod:`.memory_check`).  Returns
    False (nothing to do) for a finished publication when ``skip_finished`` and not ``overwrite`` (a fleet rerun);
    raises :class:`~lorasuite_core.errors.LorasuiteError` otherwise."""
    inputs = {"old model": old_model, "new model": new_model, "adapter": adapter, "LFT data": options.lft_data,
              "LFT prompts": options.lft_prompts, "seed prompts": options.lft_seed_prompts,
              "evaluation data": options.eval_data, "calibration data": analysis.calibration_data,
              "cache root": cache_root}          # everything a migration reads, by name
    if not check_output(output, inputs, overwrite, skip_finished=skip_finished):
        return False
    plans.check_adapter(old_model, adapter, options.serving)
    plans.check_route(old_model, new_model, options)
    if options.synthesises_prompts:
        from lorasuite_core.training import prompts

        prompts.check_seed_questions(prompts.load_prompts(options.lft_seed_prompts, None, options.seed))
    check_memory(old_model, new_model, options)
    return True


# --------------------------------------------------------------------------- executors


class Executor(Protocol):
    """Starts calls and hands back their results (raising their errors); see the module docstring."""

    def check(self, *args: Any, **kwargs: Any) -> Any: ...                       # check_entry
    def plan_pair(self, old_model: str, new_model: str, analysis: AnalysisOptions,
                  head_transform: str = "lstsq") -> PairPlan: ...
    def stage(self, name: str, stage: Stage, store: str, plan: PairPlan, adapter: AdapterPlan | None = None,
              job: Any = None, inputs: tuple = ()) -> Any: ...
    def batch(self, name: str, stage: Stage, store: str, plan: PairPlan, items: list) -> Any: ...
    def plan_adapter(self, plan: PairPlan, analysis: Any, name: str, adapter: str,
                     options: MigrationOptions) -> Any: ...
    def publish(self, store: str, name: str, final: Any, output: str, updates: dict[str, Any],
                overwrite: bool, serving: str | None, base_model: str) -> Any: ...
    def result(self, handle: Any) -> Any: ...
    def report_facts(self) -> dict[str, Any]: ...                                # the report's "pipeline" extras


@dataclass
class _Done:
    value: Any = None
    error: BaseException | None = None


def _now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _Done:
    try:
        return _Done(fn(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - handed back by result()
        return _Done(error=error)


def _value(item: Any) -> Any:
    if isinstance(item, _Done):
        return InProcess.result(item)
    return [_value(i) for i in item] if isinstance(item, (list, tuple)) else item


class InProcess:
    """Plain calls, here and now, in submission order (no Prefect)."""

    def check(self, *args: Any, **kwargs: Any) -> _Done:
        return _now(check_entry, *args, **kwargs)

    def plan_pair(self, old_model: str, new_model: str, analysis: AnalysisOptions,
                  head_transform: str = "lstsq") -> PairPlan:
        return plans.plan_pair(old_model, new_model, analysis, head_transform)

    def stage(self, name: str, stage: Stage, store: str, plan: PairPlan, adapter: AdapterPlan | None = None,
              job: Any = None, inputs: tuple = ()) -> _Done:
        return _now(call, stage, store, plan, adapter, job, tuple(_value(i) for i in inputs))

    def batch(self, name: str, stage: Stage, store: str, plan: PairPlan, items: list) -> _Done:
        return _now(call_batch, stage, store, plan, items)

    def plan_adapter(self, plan: PairPlan, analysis: Any, name: str, adapter: str, options: MigrationOptions) -> _Done:
        return _now(plans.plan_adapter, plan, _value(analysis), name, adapter, options)

    def publish(self, store: str, name: str, final: Any, output: str, updates: dict[str, Any],
                overwrite: bool, serving: str | None, base_model: str) -> _Done:
        return _now(stages.publish, StageStore.at(store), _value(final).uri, output, updates, overwrite=overwrite,
                    serving=serving, base_model=base_model)

    @staticmethod
    def result(handle: _Done) -> Any:
        if handle.error is not None:
            raise handle.error
        return handle.value

    def report_facts(self) -> dict[str, Any]:
        return {}


def call(stage: Stage, store: str, plan: PairPlan, adapter: AdapterPlan | None = None, job: Any = None,
         inputs: tuple = ()) -> StageResult:
    """One stage call, by the graph's calling convention (what both executors run)."""
    context = (() if adapter is None else (adapter,)) + (() if stage.fan_out is None else (job,))
    return stage.fn(StageStore.at(store), plan, *context, *as_uris(list(inputs)))


def call_batch(stage: Stage, store: str, plan: PairPlan, items: list) -> list:
    """One call of a batched stage for several entries: per item (an adapter plan; for a fanned-out stage, the plan,
    the job and its input, handed on as a URI) its result, or its error (graph docstring)."""
    if stage.fan_out is not None:
        items = [(adapter, job, as_uris(value)) for adapter, job, value in items]
    return stage.batch(StageStore.at(store), plan, list(items))


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class _Pick:
    """One entry's (or job's) place in a batched call: the call's handle and the index of its result."""

    call: Any
    index: int


class JobError(Exception):
    """One job of a fanned-out stage failed (after its retries); :attr:`cause` is the original error."""

    def __init__(self, label: str, cause: BaseException):
        detail = str(cause) if isinstance(cause, LorasuiteError) else describe_error(cause)
        super().__init__(f"{label}: {detail}")
        self.label, self.cause = label, cause


@dataclass
class PairRun:
    """The pair analysis: its plan and, per stage, the pending call then its result."""

    plan: PairPlan
    out: dict[str, Any] = field(default_factory=dict)

    @property
    def analysis(self) -> StageResult:
        return self.out["head_similarity"]

    def steps(self) -> dict[str, dict[str, Any]]:
        return {name: step(self.out[name]) for name in PAIR_GRAPH}


@dataclass
class EntryRun:
    """One adapter's way through the entry graph."""

    name: str
    adapter: str
    output: str
    options: MigrationOptions
    status: str = "running"          # running | published | skipped | failed
    error: str | None = None         # failed: "<stage>: <message>"
    note: str | None = None          # skipped: why
    exception: BaseException | None = field(default=None, repr=False)
    plan: AdapterPlan | None = None
    out: dict[str, Any] = field(default_factory=dict)    # entry stage -> pending call, then its result
    published: str | None = None
    waves: int = 0                   # waves done

    @property
    def live(self) -> bool:
        return self.status == "running"

    def fail(self, stage: str, error: BaseException) -> None:
        message = str(error) if isinstance(error, (LorasuiteError, JobError)) else describe_error(error)
        cause = error.cause if isinstance(error, JobError) else error
        self.status, self.error, self.exception = "failed", f"{stage}: {message}", cause

    def total_waves(self) -> int:
        """check, plan, the entry graph's levels with a stage that runs for this plan, publish."""
        runs = [level for level in levels(ENTRY_GRAPH)
                if self.plan is None or any(ENTRY_GRAPH[n].when(self.plan) for n in level)]
        return 3 + len(runs)

    def progress(self) -> float:
        return 1.0 if not self.live else min(1.0, self.waves / self.total_waves())

    @property
    def final(self) -> StageResult:
        return resolve_input(FINAL, self.out)

    @property
    def evals(self) -> dict[str, dict[str, Any]]:
        """Evaluation row -> its facts (accuracy, CI, n)."""
        return {job.row: r.facts for job, r in zip(self.plan.evals, self.out.get("eval", []))} if self.plan else {}

    def steps(self, pair: PairRun) -> dict[str, dict[str, Any]]:
        return {"load": {"cache": "computed", "seconds": round(self.plan.seconds, 4)}, **pair.steps(),
                **{stage.step: step(self.out[name]) for name, stage in ENTRY_GRAPH.items() if name in self.out}}


# --------------------------------------------------------------------------- the runner


def pair_head_transform(entries: list[EntryRun]) -> str:
    """The mode of the pair's unit maps: the one every live entry asks for, else the default (an entry in
    another mode computes its maps in its own layer jobs, see :mod:`.plans`)."""
    modes = {e.options.head_transform for e in entries if e.live}
    return modes.pop() if len(modes) == 1 else MigrationOptions.model_fields["head_transform"].default


class Runner:
    """Walks the pair graph, then the entry graph of every entry, on one executor and one stage store."""

    def __init__(self, executor: Executor, cache_root: str):
        self.x, self.store = executor, cache_root

    def run(self, old_model: str, new_model: str, analysis: AnalysisOptions, entries: list[EntryRun], *,
            overwrite: bool = False, skip_finished: bool = False, progress: Any = None,
            on_pair: Callable[[PairRun], None] | None = None) -> PairRun | None:
        """Check every entry, analyse the pair if any is left, migrate and publish; None: nothing to run.
        ``progress``: an object with ``analysis(done, total)`` and ``entries(percent)`` (or None);
        ``on_pair``: called with the finished pair analysis."""
        self.check(old_model, new_model, analysis, entries, overwrite=overwrite, skip_finished=skip_finished)
        if not any(e.live for e in entries):
            return None
        pair = self.analyse_pair(old_model, new_model, analysis, progress.analysis if progress else None,
                                 head_transform=pair_head_transform(entries))
        if on_pair:
            on_pair(pair)
        self.migrate(entries, pair, overwrite=overwrite, on_progress=progress.entries if progress else None)
        return pair

    def check(self, old_model: str, new_model: str, analysis: AnalysisOptions, entries: list[EntryRun], *,
              overwrite: bool, skip_finished: bool) -> None:
        """:func:`check_entry` for every entry, side by side; a finished one is skipped (``skip_finished``)."""
        def submit(e: EntryRun):
            handle = self.x.check(old_model, new_model, analysis, e.adapter, e.output, e.options, self.store,
                                  overwrite=overwrite, skip_finished=skip_finished)

            def collect():
                if not self.x.result(handle):
                    e.status = "skipped"
                    e.note = f"already published at {redact_uri(e.output)} (pass overwrite to redo)"
            return collect
        self._wave(entries, "check", lambda e: [("check", submit(e))])

    def analyse_pair(self, old_model: str, new_model: str, analysis: AnalysisOptions,
                     on_progress: Callable[[int, int], None] | None = None, *,
                     head_transform: str = "lstsq") -> PairRun:
        """Submit the pair graph whole (a stage waits on its inputs), then collect it in order;
        ``head_transform``: the mode of the pair's unit maps (:func:`pair_head_transform`)."""
        pair = PairRun(self.x.plan_pair(old_model, new_model, analysis, head_transform))
        names = list(PAIR_GRAPH)
        for name in names:
            stage = PAIR_GRAPH[name]
            pair.out[name] = self.x.stage(name, stage, self.store, pair.plan,
                                          inputs=tuple(resolve_input(i, pair.out) for i in stage.inputs))
        for done, name in enumerate(names, start=1):
            pair.out[name] = self.x.result(pair.out[name])
            if on_progress:
                on_progress(done, len(names))
        return pair

    def migrate(self, entries: list[EntryRun], pair: PairRun, *, overwrite: bool,
                on_progress: Callable[[float], None] | None = None) -> None:
        """plan_adapter, the entry graph level by level, publish: each a wave over the live entries."""
        def report(percent_of: list[EntryRun]) -> None:
            if on_progress:
                on_progress(100.0 * sum(e.progress() for e in percent_of) / len(percent_of))

        self._wave(entries, "load", lambda e: [("load", self._plan(e, pair))])
        report(entries)
        for level in levels(ENTRY_GRAPH):
            batched = self._batches(entries, pair, level)
            self._wave(entries, ENTRY_GRAPH[level[0]].step, lambda e: self._level(e, pair, level, batched))
            report(entries)
        self._wave(entries, "publish", lambda e: [("publish", self._publish(e, pair, overwrite))])
        report(entries)

    # ----------------------------------------------------------------- waves

    def _wave(self, entries: list[EntryRun], label: str,
              submit: Callable[[EntryRun], list[tuple[str, Callable[[], None]]]]) -> None:
        """Submit for every live entry, then collect each: ``submit`` returns ``(stage, collector)`` pairs.
        An error fails its entry only (a submission error as ``label``); an entry that ran anything did a wave."""
        collectors: dict[str, list[tuple[str, Callable[[], None]]]] = {}
        for e in entries:
            if e.live:
                try:
                    collectors[e.name] = submit(e)
                except Exception as error:  # noqa: BLE001 - a submission error fails this entry only
                    e.fail(label, error)
        for e in entries:
            ran = False
            for stage, collect in collectors.get(e.name, []):
                if not e.live:
                    break
                try:
                    collect()
                    ran = True
                except Exception as error:  # noqa: BLE001 - recorded on the entry
                    e.fail(stage, error)
            if ran and e.live:
                e.waves += 1

    def _plan(self, e: EntryRun, pair: PairRun) -> Callable[[], None]:
        handle = self.x.plan_adapter(pair.plan, pair.analysis, e.name, e.adapter, e.options)

        def collect():
            e.plan = self.x.result(handle)
        return collect

    def _batches(self, entries: list[EntryRun], pair: PairRun, level: list[str]) -> dict[str, dict[tuple, _Pick]]:
        """Submit the batched stages of ``level``: the live entries' calls of one (a fanned-out stage: its jobs that
        ``batch_key`` groups), grouped by old model or ``batch_key``, ``batch_max`` a call.  Stage -> (entry name,
        job index or None) -> the entry's place in its call."""
        batched: dict[str, dict[tuple, _Pick]] = {}
        for name in level:
            stage = ENTRY_GRAPH[name]
            if stage.batch is None:
                continue
            groups: dict[Any, list[tuple[tuple, Any]]] = {}
            for e in entries:
                if not (e.live and e.plan is not None and stage.when(e.plan)):
                    continue
                if stage.fan_out is None:
                    groups.setdefault(pair.plan.old_model, []).append(((e.name, None), e.plan))
                    continue
                for k, job in enumerate(stage.fan_out(e.plan)):
                    if stage.batch_key and stage.batch_key(e.plan, job) is not None:
                        item = (e.plan, job, resolve_input(stage.job_input(job), e.out) if stage.job_input else None)
                        groups.setdefault(stage.batch_key(e.plan, job), []).append(((e.name, k), item))
            batched[name] = {}
            for group in groups.values():
                for begin in range(0, len(group), stage.batch_max):
                    chunk = group[begin:begin + stage.batch_max]
                    try:
                        handle = self.x.batch(name, stage, self.store, pair.plan, [item for _, item in chunk])
                    except Exception as error:  # noqa: BLE001 - a submission error fails these entries only
                        handle = _Done(error=error)
                    batched[name].update({place: _Pick(handle, index) for index, (place, _) in enumerate(chunk)})
        return batched

    def _level(self, e: EntryRun, pair: PairRun, level: list[str],
               batched: dict[str, dict[tuple, _Pick]] | None = None) -> list[tuple[str, Callable[[], None]]]:
        """Submit the stages of ``level`` that run for this entry (a batched one: already submitted, ``batched``);
        their collectors, by report step."""
        collectors = []
        for name in level:
            stage = ENTRY_GRAPH[name]
            if not stage.when(e.plan):
                continue
            picks = (batched or {}).get(name, {})
            if stage.fan_out is None and (e.name, None) in picks:
                collectors.append((stage.step, self._collector(e, name, picks[(e.name, None)])))
                continue
            inputs = tuple(resolve_input(i, e.out, pair.out) for i in stage.inputs)
            if stage.fan_out is None:
                handle = self.x.stage(name, stage, self.store, pair.plan, e.plan, None, inputs)
                collectors.append((stage.step, self._collector(e, name, handle)))
                continue
            jobs = stage.fan_out(e.plan)
            handles = [picks.get((e.name, k)) or self.x.stage(
                name, stage, self.store, pair.plan, e.plan, job,
                inputs + ((resolve_input(stage.job_input(job), e.out),) if stage.job_input else ()))
                for k, job in enumerate(jobs)]
            collectors.append((stage.step, self._fan_in(e, name, jobs, handles)))
        return collectors

    def _result(self, handle: Any) -> Any:
        """A call's result; for a place in a batched call (:class:`_Pick`), its own result or error."""
        if not isinstance(handle, _Pick):
            return self.x.result(handle)
        done = InProcess.result(handle.call) if isinstance(handle.call, _Done) else self.x.result(handle.call)
        if isinstance(done[handle.index], BaseException):
            raise done[handle.index]
        return done[handle.index]

    def _collector(self, e: EntryRun, name: str, handle: Any) -> Callable[[], None]:
        def collect():
            e.out[name] = self._result(handle)
        return collect

    def _fan_in(self, e: EntryRun, name: str, jobs: list, handles: list) -> Callable[[], None]:
        def collect():
            results, first_error = [], None
            for job, handle in zip(jobs, handles):
                try:
                    results.append(self._result(handle))
                except Exception as error:  # noqa: BLE001 - wait for every job, report the first failure
                    first_error = first_error or JobError(job.label, error)
            if first_error:
                raise first_error
            e.out[name] = results
        return collect

    def _publish(self, e: EntryRun, pair: PairRun, overwrite: bool) -> Callable[[], None]:
        updates = stages.report_updates(pair.plan, e.plan, e.out, e.evals, e.steps(pair), self.store,
                                        **self.x.report_facts())
        handle = self.x.publish(self.store, e.name, e.final, e.output, updates, overwrite, e.options.serving,
                                pair.plan.new_model)

        def collect():
            e.published, e.status = self.x.result(handle), "published"
        return collect


# --------------------------------------------------------------------------- in process


def migrate_in_process(old_model: str, new_model: str, adapter: str, output: str,
                       options: MigrationOptions | None = None, analysis: AnalysisOptions | None = None, *,
                       cache_root: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run both graphs here, sequentially (no Prefect), over ``cache_root`` (default: the configured
    cache root) and publish to ``output``; returns the published report, or raises the error of the
    stage that failed."""
    options = (options or MigrationOptions()).check_single()
    old_model, new_model, adapter, output = map(str, (old_model, new_model, adapter, output))
    entry = EntryRun(name=Path(output).name or "adapter", adapter=adapter, output=output, options=options)
    Runner(InProcess(), StageStore.at(cache_root).root).run(old_model, new_model, analysis or AnalysisOptions(),
                                                            [entry], overwrite=overwrite)
    if entry.status != "published":
        raise entry.exception or LorasuiteError(f"adapter {entry.name}: {entry.error}")
    if is_remote(output):
        return read_json(join_uri(output, REPORT_NAME))
    return json.loads((Path(resolve(output)[1]) / REPORT_NAME).read_text())
