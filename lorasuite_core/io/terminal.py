"""What a person sees during a run: one line per stage with its time, and one progress bar.

Design
------
* **Events are log records.**  The stage store and the stages report progress as INFO records of
  the logger ``lorasuite_core.progress`` carrying an :class:`Event` (``record.progress``):

  - ``started``: a stage starts computing (:meth:`~lorasuite_core.pipeline.stage_store.StageStore.run`);
    ``failed``: that computation raised (a retry starts it again);
  - ``finished``: a stage entry was computed or reused, with its seconds (the same place);
  - ``expected``: ``count`` more entries of a per-adapter stage will come
    (:func:`~lorasuite_core.pipeline.stages.plan_adapter`: one per layer to transfer, one write…);
  - ``advanced``: ``count`` of ``total`` units done inside a running stage (the layer pairs of
    ``head_similarity``).

  The in-process path and the Prefect tasks both call these stage functions, so both print the
  same thing; the log file keeps every event as a line; a Prefect worker forwards them to the run log.
* **Names** are the report's ``steps``: the store's ``layer`` entries are ``transfer``,
  ``migrated`` is ``write``, ``vanilla`` is ``vanilla_baseline``.
* **One line per stage**, e.g. ``head_similarity ..... 44.5 s`` or ``vocabulary .......... 3.6 s (reused)``.
  A per-adapter stage (:data:`UNITS`) has one entry per layer, adapter or evaluation row; its
  entries are summed into one line once every expected entry has finished (in a fleet, every
  adapter's): ``transfer ............ 23.5 s (24 layers)``.  What never finished (a failed
  adapter) is summed by :meth:`TerminalHandler.finish` at the end of the command.
* **One progress bar** (tqdm, on the handler's stream) names the stage that runs and counts its
  units: layer pairs, layers (of every adapter in a fleet), adapters, evaluation rows.  Only when
  the stream is a TTY; otherwise (logs, CI) the plain lines alone.  Other terminal lines are
  written with ``tqdm.write`` so they never tear the bar.  ``-q`` shows warnings only: no lines,
  no bar (the handler's level drops the INFO events).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator

LOGGER = logging.getLogger("lorasuite_core.progress")
NAMES = {"layer": "transfer", "migrated": "write", "vanilla": "vanilla_baseline", "fresh": "fresh_start",
         "fresh_lft": "fresh_distill"}
"""Stage store name -> the report's step name."""
UNITS = {"transfer": "layers", "write": "adapters", "lft": "adapters", "vanilla_baseline": "adapters",
         "fidelity": "adapters", "gate": "adapters", "eval": "rows", "publish": "adapters", "copy": "adapters",
         "fresh_start": "adapters", "fresh_distill": "adapters", "route": "adapters", "teacher": "adapters"}
"""Per-adapter stages (one entry per unit) and what their unit is called."""
WIDTH = 20
REFRESH_S = 0.5


@dataclass(frozen=True)
class Event:
    kind: str                  # started | failed | finished | expected | advanced
    stage: str                 # a report step name (see NAMES)
    seconds: float = 0.0
    reused: bool = False
    count: int = 0             # expected: entries to come; advanced: units done
    total: int = 0             # advanced: units in all
    unit: str = ""             # advanced: what a unit is


def step_name(stage: str) -> str:
    return NAMES.get(stage, stage)


def _emit(event: Event, message: str, *args) -> None:
    LOGGER.info(message, *args, extra={"progress": event})


def started(stage: str) -> None:
    name = step_name(stage)
    _emit(Event("started", name), "%s: computing", name)


@contextmanager
def computing(stage: str) -> Iterator[None]:
    """``started`` on entry; ``failed`` when the body raises (``finished`` is the caller's, once stored)."""
    started(stage)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        name = step_name(stage)
        _emit(Event("failed", name, seconds=time.perf_counter() - start), "%s: failed after %.2f s", name,
              time.perf_counter() - start)
        raise


def finished(stage: str, seconds: float, reused: bool) -> None:
    name = step_name(stage)
    one = (_units(1, UNITS[name]),) if name in UNITS else ()
    _emit(Event("finished", name, seconds=seconds, reused=reused), "%s", stage_line(name, seconds, reused, one))


def expected(stage: str, count: int) -> None:
    name = step_name(stage)
    if count > 0:
        _emit(Event("expected", name, count=count), "%s: %s to do", name, _units(count, UNITS.get(name, "entries")))


def _units(count: int, unit: str) -> str:
    """``1 layer``, ``3 layers``."""
    return f"{count} {unit[:-1] if count == 1 and unit.endswith('s') else unit}"


def advanced(stage: str, done: int, total: int, unit: str) -> None:
    name = step_name(stage)
    _emit(Event("advanced", name, count=done, total=total, unit=unit), "%s: %d/%d %s", name, done, total, unit)


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


def stage_line(name: str, seconds: float, reused: bool, notes: tuple[str, ...] = ()) -> str:
    """``vocabulary .......... 3.60 s (reused)``: the name, dots to :data:`WIDTH`, the seconds, notes."""
    notes = notes + (("reused",) if reused else ())
    return (f"{name} {'.' * max(2, WIDTH - len(name))} {_seconds(seconds):>6} s"
            + (f" ({', '.join(notes)})" if notes else ""))


@dataclass
class _Tally:
    """The entries of one per-adapter stage seen so far."""

    expected: int = 0
    adapters: int = 0
    done: int = 0
    reused: int = 0
    seconds: float = 0.0

    def line(self, name: str) -> str:
        unit = UNITS.get(name, "entries")
        count = (f"{self.done} of {_units(self.expected, unit)}" if self.done < self.expected
                 else _units(self.done, unit))
        notes = []
        if unit != "adapters" or self.done > 1 or self.done < self.expected:
            notes.append(count if unit == "adapters" or self.adapters <= 1 else f"{count} of {self.adapters} adapters")
        if 0 < self.reused < self.done:
            notes.append(f"{self.reused} reused")
        return stage_line(name, self.seconds, self.done > 0 and self.reused == self.done, tuple(notes))


@dataclass
class _Board:
    """Per-stage state behind the lines and the bar (used under the handler's lock)."""

    tallies: dict[str, _Tally] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    counts: dict[str, tuple[int, int, str]] = field(default_factory=dict)   # stage -> (done, total, unit)
    current: str | None = None

    def handle(self, event: Event) -> list[str]:
        """Update the state; the lines to print."""
        name = event.stage
        if event.kind == "expected":
            tally = self.tallies.setdefault(name, _Tally())
            tally.expected += event.count
            tally.adapters += 1
        elif event.kind == "started":
            self.running[name] = self.running.get(name, 0) + 1
            self.current = name
        elif event.kind == "advanced":
            self.counts[name] = (event.count, event.total, event.unit)
            self.current = name
        elif event.kind == "failed":
            self._ended(name)
            self._settle(name)
        elif event.kind == "finished":
            if not event.reused:               # a reused entry was never started
                self._ended(name)
            tally = self.tallies.get(name)
            if tally is None:
                self.counts.pop(name, None)
                lines = [stage_line(name, event.seconds, event.reused)]
            else:
                tally.done += 1
                tally.reused += event.reused
                tally.seconds += event.seconds
                self.current = self.current or name
                lines = []
                if tally.done >= tally.expected:
                    del self.tallies[name]
                    lines = [tally.line(name)]
            self._settle(name)
            return lines
        return []

    def _ended(self, name: str) -> None:
        self.running[name] = max(0, self.running.get(name, 0) - 1)

    def _settle(self, name: str) -> None:
        """The bar moves on from ``name`` once it has nothing running and nothing more to come."""
        if self.current == name and name not in self.tallies and not self.running.get(name):
            self.current = next((s for s in reversed(self.running) if self.running[s]), None)

    def progress(self) -> tuple[str, int, int | None, str]:
        """What the bar shows: the stage that runs, units done, units in all (None: unknown), unit."""
        name = self.current or ""
        if name in self.tallies:
            tally = self.tallies[name]
            unit = UNITS.get(name, "entries")
            if tally.adapters > 1 and unit != "adapters":
                unit = f"{unit} of {tally.adapters} adapters"
            return name, tally.done, tally.expected, unit
        if name in self.counts:
            done, total, unit = self.counts[name]
            return name, done, total, unit
        return name, 0, None, ""

    def finish(self) -> list[str]:
        """Lines of the per-adapter stages that did not finish every expected entry."""
        lines = [tally.line(name) for name, tally in self.tallies.items() if tally.done]
        self.tallies.clear()
        return lines


class TerminalHandler(logging.StreamHandler):
    """Writes terminal lines, renders progress events as stage lines and one tqdm bar (TTY only).

    ``bar``: None decides from the stream (a TTY gets the bar).  Records without an event are
    formatted by the handler's formatter as usual.
    """

    def __init__(self, stream: IO[str] | None = None, bar: bool | None = None):
        super().__init__(stream if stream is not None else sys.stderr)
        isatty = getattr(self.stream, "isatty", None)
        self.with_bar = bool(isatty and isatty()) if bar is None else bar
        self.board = _Board()
        self._bar = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- writing

    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + self.terminator)
        self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "progress", None)
            if not isinstance(event, Event):
                self._write(self.format(record))
                return
            lines = self.board.handle(event)
            if not self.board.progress()[0]:
                self._close_bar()          # nothing runs: no bar (until the next stage starts)
            for line in lines:
                self._write(line)
            if self.with_bar:
                self._show()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    # ---- the bar

    def _show(self) -> None:
        name, done, total, unit = self.board.progress()
        if not name:
            return
        form = "{desc} |{bar}| {n_fmt}/{total_fmt} " + unit + " [{elapsed}]" if total else "{desc} ... [{elapsed}]"
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(file=self.stream, total=total, initial=done, desc=name, bar_format=form, leave=False,
                             dynamic_ncols=True, mininterval=0)
            if self._ticker is None:
                self._start_ticker()
            return
        bar = self._bar
        if bar.desc != name or bar.total != total:
            bar.reset(total=total)
            bar.set_description_str(name, refresh=False)
        bar.bar_format = form
        bar.n = done
        bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _start_ticker(self) -> None:
        """Refresh the bar's clock between events (a long stage sends none)."""
        def tick():
            while not self._stop.wait(REFRESH_S):
                with self.lock:
                    if self._bar is not None:
                        self._bar.refresh()

        self._stop.clear()
        self._ticker = threading.Thread(target=tick, name="lorasuite-progress", daemon=True)
        self._ticker.start()

    def finish(self) -> None:
        """End of the command: the unfinished per-adapter stages' lines, then the bar removed."""
        with self.lock:
            self._stop.set()
            self._close_bar()
            for line in self.board.finish():
                self._write(line)
            self.board = _Board()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    def close(self) -> None:
        self.finish()
        super().close()
