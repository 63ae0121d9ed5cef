"""What a person sees on the terminal (:mod:`lorasuite_core.io.terminal`, :mod:`lorasuite_core.io.logsetup`).

* A CLI migration prints one line per stage with its time — the time of the report's ``steps`` —
  and nothing else but the log file's name; no content hash and no store path without ``-v``,
  both with ``-v``; the log file has them either way.
* Stderr on a TTY gets one progress bar naming the running stage and counting its layers; stderr
  that is not a TTY gets the plain lines only.
* A FutureWarning raised by a library during a run lands in the log file, not on the terminal.
* The terminal sums a per-adapter stage over a fleet's adapters into one line, says what never
  finished, and names a failed fleet entry.
"""
from __future__ import annotations

import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest

from flows.cli import main
from lorasuite_core.io import terminal
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

needs_prefect = pytest.mark.usefixtures("prefect_server")

PAIR_STAGES = ("vocabulary", "activations", "transfer_matrix", "cka", "layer_mapping", "head_similarity", "unit_maps")
STAGES = PAIR_STAGES + ("transfer", "write", "teacher", "fidelity", "publish")
LINE = re.compile(r"^(\w+) \.{2,} +(\d+\.(\d+)) s(?: \((.*)\))?$")
HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    old = make_tiny_model_dir("llama", root / "old", seed=31)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, identity_layers=(1,)))
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=32)
    return old, new, adapter


def migrate_args(pair, out: Path, cache: Path, *extra: str) -> list[str]:
    old, new, adapter = pair
    return [*extra, "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
            "--output", str(out), "--no-lft", "--max-calibration-tokens", "256", "--cache-root", str(cache)]


def stage_lines(err: str) -> dict[str, re.Match]:
    """Stage name -> its line; fails on a stage printed twice."""
    found: dict[str, re.Match] = {}
    for line in err.splitlines():
        match = LINE.match(line)
        if match:
            assert match.group(1) not in found, f"{match.group(1)} printed twice:\n{err}"
            found[match.group(1)] = match
    return found


def log_text(log_dir: Path) -> str:
    logs = list(log_dir.glob("*-migrate-*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


@needs_prefect
def test_one_line_per_stage_with_its_time_hashes_and_paths_only_with_verbose(pair, tmp_path, capsys, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    monkeypatch.setenv("LORASUITE_LOG_DIR", str(tmp_path / "logs"))
    assert main(migrate_args(pair, out, cache)) == 0
    err = capsys.readouterr().err
    lines = stage_lines(err)
    assert set(lines) == set(STAGES), err
    assert list(lines)[-5:] == ["transfer", "write", "teacher", "fidelity", "publish"], err
    others = [line for line in err.splitlines() if not LINE.match(line)]
    assert len(others) == 1 and others[0].startswith("log file: "), err       # nothing else
    assert "\r" not in err, "no progress bar when stderr is not a TTY"

    # the times are the report's: computed stages, transfer summed over its layers
    report = json.loads((out / "migration_report.json").read_text())
    for stage in STAGES[:-1]:
        match, step = lines[stage], report["steps"][stage]
        assert step["cache"] == "computed" and match.group(4) in (None, f"{len(report['layer_mapping'])} layers")
        assert abs(float(match.group(2)) - step["seconds"]) <= 0.6 * 10 ** -len(match.group(3)), (stage, step)
    assert lines["transfer"].group(4) == f"{len(report['layer_mapping'])} layers"

    store = str(cache.resolve())
    assert not HEX64.search(err) and store not in err, err
    logged = log_text(tmp_path / "logs")
    assert HEX64.search(logged) and f"{store}/head_similarity/" in logged     # the log file still has everything

    # -v: the same lines (everything reused), and the entries' hashes and paths
    monkeypatch.setenv("LORASUITE_LOG_DIR", str(tmp_path / "logs-verbose"))
    assert main(migrate_args(pair, tmp_path / "out2", cache, "-v")) == 0
    err = capsys.readouterr().err
    lines = stage_lines(err)
    assert set(lines) == set(STAGES), err
    assert all(lines[s].group(4) in ("reused", f"{len(report['layer_mapping'])} layers, reused") for s in STAGES[:-1])
    assert HEX64.search(err) and f"{store}/head_similarity/" in err, err


@needs_prefect
def test_library_future_warning_goes_to_the_log_file_only(pair, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from lorasuite_core.pipeline import pair_stages

    original = AutoTokenizer.from_pretrained
    text = "`from_pretrained(..., legacy=True)` is deprecated and will be removed in v99"

    def deprecated(*args, **kwargs):          # a library's deprecation notice, raised where the library runs
        warnings.warn(text, FutureWarning, stacklevel=2)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", deprecated)
    monkeypatch.setenv("LORASUITE_LOG_DIR", str(tmp_path / "logs"))
    pair_stages.clear_memo()                       # the tokenizers are loaded again, in the vocabulary task
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(migrate_args(pair, tmp_path / "out", tmp_path / "cache")) == 0
    err = capsys.readouterr().err
    assert set(stage_lines(err)) == set(STAGES), err
    assert "Warning" not in err and text not in err, err
    logged = log_text(tmp_path / "logs")
    assert f"WARNING py.warnings: " in logged and f"FutureWarning: {text}" in logged


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@needs_prefect
def test_a_tty_gets_one_progress_bar_over_the_layers(pair, tmp_path, monkeypatch):
    screen = FakeTTY()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("LORASUITE_LOG_DIR", str(tmp_path / "logs"))
    assert main(migrate_args(pair, tmp_path / "out", tmp_path / "cache")) == 0
    shown = screen.getvalue()
    # the bar: redrawn in place (carriage returns), naming the stage and counting its units
    assert re.search(r"\rhead_similarity \|[^\r\n]*\| \d+/\d+ layer pairs \[", shown), shown
    assert re.search(r"\rtransfer \|[^\r\n]*\| \d+/\d+ layers \[", shown), shown
    # what stays on the screen: the same lines as without a TTY (the bar erased before each)
    kept = [segment.rsplit("\r", 1)[-1] for segment in shown.split("\n")]
    assert set(stage_lines("\n".join(kept))) == set(STAGES), shown
    assert all(LINE.match(line) or line.startswith("log file: ") for line in kept if line.strip()), kept


@needs_prefect
def test_a_fleet_prints_each_stage_once_over_its_adapters_and_names_a_failed_one(pair, tmp_path, capsys,
                                                                                 monkeypatch):
    old, new, adapter = pair
    second = make_random_lora_adapter(old, tmp_path / "second", rank=4, alpha=8, seed=33)
    manifest = tmp_path / "fleet.json"
    manifest.write_text(json.dumps({
        "old_model": str(old), "new_model": str(new), "output_root": str(tmp_path / "out"),
        "analysis": {"max_calibration_tokens": 256},
        "adapters": [{"name": "a", "adapter": str(adapter)}, {"name": "b", "adapter": str(second)},
                     {"name": "gone", "adapter": str(tmp_path / "missing")}]}))
    monkeypatch.setenv("LORASUITE_LOG_DIR", str(tmp_path / "logs"))
    assert main(["migrate-fleet", "--manifest", str(manifest), "--cache-root", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    lines = stage_lines(err)
    assert set(lines) == set(STAGES), err
    assert re.fullmatch(r"\d+ layers of 2 adapters", lines["transfer"].group(4)), err
    assert lines["write"].group(4) == lines["publish"].group(4) == "2 adapters", err
    assert lines["teacher"].group(4) == "2 adapters", err          # one batched call, a line over both adapters
    failed = [line for line in err.splitlines() if line.startswith("warning: adapter gone failed at check: ")]
    assert len(failed) == 1 and "missing" in failed[0], err
    assert not HEX64.search(err), err


# --------------------------------------------------------------------------- the handler alone


def events_into(handler: logging.Handler, *calls) -> None:
    """The events of ``calls`` to ``handler`` alone (not to handlers an earlier in-process CLI run left on root)."""
    logger = terminal.LOGGER
    logger.addHandler(handler)
    previous = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        for fn, *args in calls:
            fn(*args)
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = previous


def fail_computing(stage: str) -> None:
    with terminal.computing(stage):
        raise RuntimeError("layer failed")


def test_a_fleet_stage_is_one_line_over_its_adapters_and_the_unfinished_are_said():
    plain = io.StringIO()
    handler = terminal.TerminalHandler(plain)
    assert not handler.with_bar
    events_into(handler,
                (terminal.started, "vocabulary"), (terminal.finished, "vocabulary", 3.6, True),
                (terminal.expected, "layer", 2), (terminal.expected, "migrated", 1),    # adapter a
                (terminal.expected, "layer", 3), (terminal.expected, "migrated", 1),    # adapter b
                *[(terminal.finished, "layer", 0.25, n == 0) for n in range(5)],
                (terminal.finished, "migrated", 12.25, False))                          # b failed before write
    assert plain.getvalue().splitlines() == [
        "vocabulary ..........   3.60 s (reused)",
        "transfer ............   1.25 s (5 layers of 2 adapters, 1 reused)"]
    handler.finish()
    assert plain.getvalue().splitlines()[-1] == "write ...............   12.2 s (1 of 2 adapters)"


def test_the_bar_names_the_stage_and_counts_a_fleets_layers():
    screen = FakeTTY()
    handler = terminal.TerminalHandler(screen)
    assert handler.with_bar
    events_into(handler, (terminal.expected, "layer", 2), (terminal.expected, "layer", 1),
                (terminal.started, "layer"), (terminal.finished, "layer", 0.5, False),
                (terminal.started, "layer"), (terminal.finished, "layer", 0.5, False))
    shown = screen.getvalue()
    assert re.search(r"\rtransfer \|[^\r]*\| 1/3 layers of 2 adapters \[", shown), shown
    assert re.search(r"\rtransfer \|[^\r]*\| 2/3 layers of 2 adapters \[", shown), shown
    assert "\n" not in shown                   # no line until the stage is done
    with pytest.raises(RuntimeError):          # a layer fails (its retry would start it again): no line
        events_into(handler, (fail_computing, "layer"))
    assert "\n" not in screen.getvalue() and handler.board.running == {"transfer": 0}
    handler.finish()
    assert screen.getvalue().endswith("transfer ............   1.00 s (2 of 3 layers of 2 adapters)\n")
