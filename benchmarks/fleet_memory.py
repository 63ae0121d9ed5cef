"""RSS of an in-process data-free fleet at every stage line: what a finished stage leaves resident (issue 23).

One child process (``PYTHONPATH`` = ``--repo``: this checkout, or a ``git worktree`` of an older commit for the
"before" figures) runs the stage graph in process (``Runner(InProcess(), ...)``) on the same-shape SmolLM2 pair,
for three entries: each skill's old adapter (``--adapters DIR/SKILL/old_adapter-s0``, from the same-shape skill
fleet), distilled on ``task:SKILL:train:116`` (100 prompts + 16 held out), ``fidelity: false``, seed 7.  The pair
stages are reused from ``--store`` (copied first to a fresh directory, its ``teacher``, ``lft`` and ``migrated``
entries dropped), so the measured stages are the teacher answers (one call for the three) and the three
distillations, one after another, as in ``lorasuite migrate-fleet``.

At every finished stage's terminal line the child prints its RSS (``/proc/self/status`` VmRSS) and its peak
(``ru_maxrss``).  Results: ``benchmarks/results/fleet_memory.json`` under ``--label``.

    LORASUITE_BENCH_THREADS=1 .venv/bin/python benchmarks/fleet_memory.py --label before --repo WORKTREE_OF_OLD \\
        --store STORE --adapters ADAPTERS
    LORASUITE_BENCH_THREADS=1 .venv/bin/python benchmarks/fleet_memory.py --label after --store STORE --adapters ADAPTERS
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, loadavg, merge_json
from same_shape_model import models_root

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fleet_memory.json"
SKILLS = ("arithmetic", "family_relationships", "chain_sum")

CHILD = r"""
import logging, os, resource, sys, time
import torch
torch.set_num_threads(int(os.environ["THREADS"]))
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner
from lorasuite_core.pipeline.stage_store import StageStore

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e6

class Lines(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "....." in msg:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"RSS {time.time():.1f} {rss():.3f} {peak:.3f} {msg[:70]}", flush=True)

progress = logging.getLogger("lorasuite_core.progress")
progress.setLevel(logging.INFO)
progress.addHandler(Lines())
old, new, store, adapters, out = sys.argv[1:6]
entries = [EntryRun(name=s, adapter=f"{adapters}/{s}/old_adapter-s0", output=f"{out}/{s}",
                    options=MigrationOptions(lft_mode="distill", lft_prompts=f"task:{s}:train:116", lft_samples=100,
                                             gate_prompts=16, fidelity=False, seed=7).check_single())
           for s in sys.argv[6:]]
print(f"RSS {time.time():.1f} {rss():.3f} 0 start", flush=True)
Runner(InProcess(), StageStore.at(store).root).run(old, new, AnalysisOptions(), entries)
print(f"RSS {time.time():.1f} {rss():.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3f} end "
      + ",".join(e.status for e in entries), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--repo", default=str(ROOT), help="the code to measure (the child's PYTHONPATH)")
    parser.add_argument("--store", required=True, help="a stage store holding the pair's analysis")
    parser.add_argument("--adapters", required=True, help="DIR with SKILL/old_adapter-s0 for each skill")
    args = parser.parse_args()
    threads = int(os.environ.get("LORASUITE_BENCH_THREADS", "1"))
    repo = Path(args.repo).resolve()
    with tempfile.TemporaryDirectory(prefix="fleet-memory-") as work:
        store = Path(work) / "store"
        shutil.copytree(args.store, store, ignore=lambda d, names: [n for n in names if Path(d) == Path(args.store)
                                                                     and n in ("teacher", "lft", "migrated")])
        env = dict(os.environ, PYTHONPATH=str(repo), THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        start, load = time.time(), loadavg()
        old = models_root() / "smollm2-135m-instruct" / "hf"
        new = models_root() / "smollm2-135m-instruct-cpt-shakespeare" / "hf"
        done = subprocess.run([sys.executable, "-c", CHILD, str(old), str(new), str(store), args.adapters, str(Path(work) / "out"),
                               *SKILLS], env=env, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("RSS "):
            _, t, now, peak, what = line.split(" ", 4)
            rows.append({"s": round(float(t) - start, 1), "rss_gb": float(now), "peak_gb": float(peak),
                         "line": " ".join(what.split())})
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    entry = {"command": " ".join(["LORASUITE_BENCH_THREADS=" + str(threads), ".venv/bin/python",
                                  "benchmarks/fleet_memory.py", *sys.argv[1:]]),
             "code": commit, "cpu": cpu_model(), "threads": threads, "loadavg_start": load, "loadavg_end": loadavg(),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "skills": list(SKILLS), "rows": rows}
    merge_json(RESULTS, {args.label: entry})
    for row in rows:
        print(f"{row['s']:7.1f} s  RSS {row['rss_gb']:.2f} GB  peak {row['peak_gb']:.2f} GB  {row['line']}")


if __name__ == "__main__":
    main()
