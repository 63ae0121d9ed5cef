"""A fleet's teacher answers: one old base per adapter (before) against one base for all, mixed batches (after).

Issue 23, item 3.  Every distilled migration first has the old model + the old adapter answer its prompts (the
``teacher`` stage).  Before the stage was batched, each adapter of a fleet loaded the old base and generated alone.
Now the runner hands one call every adapter of a level (``pipeline/teacher_stage.py``), and one base holding all of
them generates with rows of different adapters side by side in the same batches (PEFT mixed-adapter batches): a
decode step reads the base weights once for every adapter.

Modes, each in a fresh child process at ``LORASUITE_BENCH_THREADS`` torch threads (the stage's own generation
settings, ``teacher_stage.GENERATION``: batches of 16 rows, each skill's token budget, float32 on a CPU):

  separate   for each adapter, ``teacher_completions(old, {adapter})``: its own base load and pass (before)
  one_load   ``teacher_completions(old, all, mixed=False)``: one base load, one pass per adapter (what a bf16 CUDA
             device gets, where batch shape changes the rounding)
  mixed      ``teacher_completions(old, all, mixed=True)``: one base load, one pass, mixed batches (after, on a CPU)
  mixed_wide ``mixed`` with ``--wide-batch`` rows a batch (default 64) instead of the stage's 16: what a bigger batch
             buys once the adapters share one

Prompts: each adapter's skill's ``task:SKILL:train:P`` prompts (seed 0); with ``--same-task NAME`` every adapter answers
``task:NAME:train:P`` (one task: the batches really mix adapters; with a skill each, generation goes task by task,
so a "mixed" batch holds one adapter's rows and only PEFT's per-row routing differs).  Each mode records wall and CPU seconds,
peak RSS, the generated tokens and a digest of every completion's token ids; the modes must agree token for token
(``identical``), the property ``tests/test_mixed_teachers.py`` checks on tiny models.

Adapters: the skill fleet's old adapters (``benchmarks/skill_fleet.py``; its ``--workdir``) by default, or
``--adapter SKILL=DIR`` (repeatable).

Usage
  LORASUITE_BENCH_THREADS=1 .venv/bin/python benchmarks/teacher_batch.py [--prompts 32] [--same-task NAME]
  .venv/bin/python benchmarks/teacher_batch.py --markdown        # benchmarks/TEACHER_BATCH.md (keeps its Findings)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import cpu_model, gemm_gflops, loadavg, merge_json  # noqa: E402
from migration_benchmark import _threads, run_child  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "teacher_batch.json"
MARKDOWN = ROOT / "benchmarks" / "TEACHER_BATCH.md"
FINDINGS = "## Findings"
MODES = ("separate", "one_load", "mixed", "mixed_wide")
SKILLS = ("arithmetic", "family_relationships", "knowledge", "letter_counting")


def stage(mode: str, old_dir: str, adapters: dict[str, str], n_prompts: int, wide: int = 64,
          same_task: str | None = None) -> dict:
    """One mode in this (child) process: the completions' digest, token count and the peak RSS."""
    _threads()
    import resource

    from lorasuite_core.pipeline.teacher_stage import GENERATION
    from lorasuite_core.training.completions import teacher_completions
    from lorasuite_core.training.prompts import load_prompts

    jobs = {skill: (path, load_prompts(f"task:{same_task or skill}:train:{n_prompts}", n_prompts, 0))
            for skill, path in adapters.items()}
    start = time.perf_counter()
    if mode == "separate":
        answers = {}
        for skill, job in jobs.items():
            answers.update(teacher_completions(old_dir, {skill: job}, **GENERATION))
    else:
        generation = {**GENERATION, **({"batch_size": wide} if mode == "mixed_wide" else {})}
        answers = teacher_completions(old_dir, jobs, mixed=mode.startswith("mixed"), **generation)
    seconds = time.perf_counter() - start
    ids = {skill: [list(c.ids) for c in answers[skill]] for skill in adapters}
    return {"mode": mode, "seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "tokens": sum(len(i) for rows in ids.values() for i in rows),
            "digest": hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()[:16],
            "examples": {skill: answers[skill][0].text[:80] for skill in adapters}}


def machine(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "gemm_2048_gflops": {"float32": gemm_gflops(), "bfloat16": gemm_gflops(torch.bfloat16)},
            "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_markdown(results: Path = RESULTS, path: Path = MARKDOWN) -> str:
    data = json.loads(results.read_text())
    lines = ["# A fleet's teacher answers: a base load per adapter, one load, mixed-adapter batches", "",
             f"Generated by `benchmarks/teacher_batch.py --markdown` from `benchmarks/results/{results.name}`; the "
             "modes are defined in the script's docstring. Every mode gave the same completions, token for token, in "
             "each run (`identical`).", ""]
    for key, run in data.items():
        m = run["machine"]
        lines += [f"## {key}: {len(run['adapters'])} adapters x {run['prompts_per_adapter']} prompts, "
                  + (f"every adapter on {run['same_task']}'s prompts" if run.get("same_task")
                     else "each adapter on its own skill's prompts"), "",
                  f"- command: `{run['command']}`",
                  f"- CPU: {m['cpu']} ({m['cpus']} CPUs; the other one busy with a 1-thread benchmark), torch threads "
                  f"{m['threads']}, 2048² GEMM {m['gemm_2048_gflops']} GFLOP/s, torch {m['torch']}, {m['date']}",
                  f"- adapters: {', '.join(run['adapters'])}; identical completions in every mode: {run['identical']}",
                  "", "| mode | wall s | CPU s | peak RSS GiB | tokens generated | speed-up vs a load per adapter |",
                  "|---|---|---|---|---|---|"]
        for mode, r in run["modes"].items():
            speed = (run.get("speedup_vs_separate") or {}).get(mode)
            lines.append(f"| {mode} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
                         f"{r['tokens']} | {'–' if speed is None else f'{speed:.2f}x'} |")
        lines.append("")
    kept = ""
    if path.is_file() and FINDINGS in path.read_text():
        kept = FINDINGS + path.read_text().split(FINDINGS, 1)[1]
    text = "\n".join(lines) + "\n" + kept
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts per adapter")
    parser.add_argument("--old-model", default="smollm2-135m-instruct")
    parser.add_argument("--fleet-workdir", default=str(ROOT / "runs" / "skill-fleet" / "cross"))
    parser.add_argument("--adapter", action="append", default=[], metavar="SKILL=DIR")
    parser.add_argument("--wide-batch", type=int, default=64, help="rows a batch in mode mixed_wide")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--same-task", help="every adapter answers this task's prompts (default: its own skill's)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--markdown", action="store_true", help="render benchmarks/TEACHER_BATCH.md and stop")
    args = parser.parse_args()
    if args.markdown:
        print(write_markdown(Path(args.results)))
        return
    threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    from lorasuite_core.models.model_fetch import fetch_model

    old = args.old_model if Path(args.old_model).is_dir() else str(fetch_model(args.old_model))
    adapters = dict(a.split("=", 1) for a in args.adapter) or {
        s: str(Path(args.fleet_workdir) / "adapters" / s / "old_adapter-s0") for s in SKILLS}
    adapters = {s: d for s, d in adapters.items() if (Path(d) / "adapter_config.json").is_file()}
    if len(adapters) < 2:
        sys.exit(f"teacher_batch: need at least 2 adapters, found {sorted(adapters)}")
    record = {"command": f"LORASUITE_BENCH_THREADS={threads} .venv/bin/python benchmarks/teacher_batch.py "
                        + shlex.join(sys.argv[1:]),
              "old_model": args.old_model, "adapters": sorted(adapters), "prompts_per_adapter": args.prompts,
              "same_task": args.same_task,
              "wide_batch": args.wide_batch, "machine": run_child(machine, threads), "modes": {}}
    key = f"{len(adapters)}x{args.prompts}-t{threads}" + (f"-{args.same_task}" if args.same_task else "")
    before = json.loads(Path(args.results).read_text()).get(key, {}) if Path(args.results).is_file() else {}
    record["modes"] = {m: r for m, r in before.get("modes", {}).items() if m not in args.modes}   # kept: other modes
    for mode in args.modes:
        print(f"[teacher-batch] {mode} ...", flush=True)
        record["modes"][mode] = run_child(stage, mode, old, adapters, args.prompts, args.wide_batch, args.same_task)
        print(f"[teacher-batch] {mode}: {record['modes'][mode]['seconds']:.1f} s", flush=True)
    record["identical"] = len({m["digest"] for m in record["modes"].values()}) == 1
    base = record["modes"].get("separate")
    record["speedup_vs_separate"] = {m: round(base["seconds"] / r["seconds"], 2)
                                     for m, r in record["modes"].items()} if base else None
    merge_json(args.results, {key: record})
    print(json.dumps({k: record[k] for k in ("identical", "speedup_vs_separate")}))


if __name__ == "__main__":
    main()
