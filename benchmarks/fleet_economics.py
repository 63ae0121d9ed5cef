"""Fleet economics on the Qwen pair (issue 23): the first adapter, the marginal one, distill-100 into the 1.5B and a
data-free fleet of five, each timed as a user runs it.

Pair: Qwen2.5-Coder-0.5B-Instruct -> Qwen2.5-Coder-1.5B-Instruct (``lorasuite models fetch``'s fp32 directories).

Old adapters: one LoRA per skill (:data:`SKILLS`) on the 0.5B, ``lorasuite train --data task:SKILL:train:64
--epochs 1 --lr 3e-4 --rank 16 --alpha 32 --seed 0`` (rank 16 on the seven targets, like every benchmark adapter).
They are small on purpose: the targets are costs, and what a data-free adapter costs is the teacher's answers and
the distillation, which depend on the prompts and the answer budget, not on how well the teacher learnt its skill.
bfcl is left out: its 700-token prompts are not the typical adapter's.

Runs (each a fresh CLI process under ``/usr/bin/time -v``, ``OMP_NUM_THREADS`` = ``--threads``):

  first     ``lorasuite migrate --no-lft --no-fidelity`` of the first adapter on a FRESH stage store: the first
            adapter of a pair, transfer only (target <= 60 s, <= 3 GB)
  fleet     ``lorasuite migrate-fleet`` of the five on another FRESH store, data-free: defaults ``lft_mode:
            distill, lft_samples: 100, gate_prompts: 16, fidelity: false``, each entry distilling on
            ``task:SKILL:train:116`` (100 training prompts + 16 held out) -- the pair analysis, one teacher call
            for the five (one 0.5B load), and per entry the transfer and distill-100 into the 1.5B (target: the
            fleet <= 30 min in all; one adapter's distill-100 <= 5 min; the marginal transfer <= 10 s)

From each entry's ``migration_report.json``: per-stage seconds (computed / reused).  Recorded with the machine
(lscpu model, 1024² GEMM fp32 and bf16 at the run's threads, load average) in
``benchmarks/results/fleet_economics.json``; a rerun resumes (finished runs are kept; delete the work directory's
``fleet-store`` and the JSON's ``fleet`` to measure again).  ``--markdown`` writes ``benchmarks/FLEET_ECONOMICS.md``.

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/fleet_economics.py &
  .venv/bin/python benchmarks/fleet_economics.py --markdown
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import merge_json  # noqa: E402
from skill_fleet import machine, run_cli  # noqa: E402

from migration_benchmark import run_child  # noqa: E402

OLD, NEW = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
SKILLS = ("arithmetic", "family_relationships", "chain_sum", "knowledge", "letter_counting")
OLD_N, N_100, HELD = 64, 100, 16
RESULTS = ROOT / "benchmarks" / "results" / "fleet_economics.json"
#: The newest measurement of the first adapter (a labelled run), shown under the first one in the targets table.
LATEST_FIRST = "first_lean"
#: The newest measurement of the whole fleet (a labelled run), shown under the first one.
LATEST_FLEET = "fleet_lean5"
TARGETS = {"first": "≤ 60 s, ≤ 3 GB", "marginal": "≤ 10 s", "distill": "≤ 5 min", "fleet": "≤ 30 min in all"}


def reports(output_root: Path) -> dict:
    found = {}
    for skill in SKILLS:
        path = output_root / skill / "migration_report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            found[skill] = {"steps": report.get("steps"), "light_finetune": {
                k: v for k, v in (report.get("light_finetune") or {}).items() if k in (
                    "mode", "n_prompts", "n_heldout", "teacher_agreement_before", "teacher_agreement_after",
                    "seconds", "training")}}
    return found


class Run:
    def __init__(self, args):
        from lorasuite_core.models.model_fetch import fetch_model

        self.args, self.work = args, Path(args.workdir)
        self.old, self.new = str(fetch_model(OLD)), str(fetch_model(NEW))
        self.data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}

    def save(self, key: str, value) -> None:
        self.data[key] = value
        merge_json(RESULTS, {key: value})

    def adapter(self, skill: str) -> str:
        return str(self.work / "old" / skill)

    def run(self) -> None:
        threads = self.args.threads
        if "machine" not in self.data:
            self.save("machine", run_child(machine, threads))
            self.save("command", self.args.command)
        old = dict(self.data.get("old_adapters", {}))
        for skill in SKILLS:
            if skill not in old or not (Path(self.adapter(skill)) / "adapter_model.safetensors").is_file():
                print(f"[fleet-economics] old adapter {skill} ...", flush=True)
                old[skill] = run_cli(["train", "--model", self.old, "--data", f"task:{skill}:train:{OLD_N}",
                                      "--output", self.adapter(skill), "--overwrite", "--epochs", "1", "--lr", "3e-4",
                                      "--rank", "16", "--alpha", "32", "--seed", "0"], threads)
                self.save("old_adapters", old)
        first_label = "first" + (f"_{self.args.label}" if self.args.label else "")
        if first_label not in self.data and self.args.only in (None, "first"):
            print(f"[fleet-economics] first adapter, fresh store ({first_label}) ...", flush=True)
            out = self.work / f"{first_label}-out"
            quiet = [] if self.args.label else ["-q"]     # a labelled run keeps the stage lines for its RSS trace
            first = run_cli([*quiet, "migrate", "--old-model", self.old, "--new-model", self.new, "--adapter",
                             self.adapter(SKILLS[0]), "--output", str(out), "--overwrite", "--no-lft", "--no-fidelity",
                             "--cache-root", str(self.work / f"{first_label}-store-{os.getpid()}")], threads,
                            rss_trace=bool(self.args.label))
            first["steps"] = json.loads((out / "migration_report.json").read_text()).get("steps")
            first["code"] = git_head()
            self.save(first_label, first)
        label = "fleet" + (f"_{self.args.label}" if self.args.label else "")
        if label not in self.data and self.args.only in (None, "fleet"):
            print(f"[fleet-economics] data-free fleet of five, fresh store ({label}) ...", flush=True)
            manifest = self.work / "fleet.json"
            manifest.write_text(json.dumps({
                "old_model": self.old, "new_model": self.new, "output_root": str(self.work / f"{label}-out"),
                "defaults": {"lft_mode": "distill", "lft_samples": N_100, "gate_prompts": HELD, "fidelity": False},
                "adapters": [{"name": s, "adapter": self.adapter(s),
                              "overrides": {"lft_prompts": f"task:{s}:train:{N_100 + HELD}"}}
                             for s in self.args.fleet_skills]},
                indent=2))
            fleet = run_cli(["migrate-fleet", "--manifest", str(manifest), "--overwrite", "--cache-root",
                             str(self.work / f"{label}-store-{os.getpid()}")], threads, rss_trace=bool(self.args.label))
            fleet["entries"] = reports(self.work / f"{label}-out")
            fleet["skills"] = list(self.args.fleet_skills)
            fleet["code"] = git_head()
            self.save(label, fleet)


def git_head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


PAIR_STAGES = ("vocabulary", "activations", "transfer_matrix", "cka", "layer_mapping", "head_similarity", "unit_maps")


def _s(steps: dict, *names: str) -> float:
    return sum((steps.get(n) or {}).get("seconds", 0.0) for n in names)


#: What limits each target (numbers from this run's records, the FLOP counts of SCALE.md and the teacher entries).
LIMITS = """## What limits it

Measured at one torch thread on one core of a 2-core AMD EPYC (1024² GEMM 92.6 GFLOP/s fp32, 213 GFLOP/s bf16),
with the same-shape skill fleet (one thread) on the other core throughout and `.ci/run` on both from 07:51 to
08:15 UTC (load average 3 most of the time), so the wall seconds are upper bounds; the issue's numbers came from a
2-thread Xeon with AMX (380 GFLOP/s fp32, 2.4 TFLOP/s bf16).

- **First adapter, ≤ 60 s: missed (287 s; 277 s since ded4134, `first_lean` below).** Its floor is compute. The
  activations' forward passes are ≈ 4.9 TFLOP fp32 (SCALE.md: 1,480 padded tokens × 2 × 1.67·10⁹ parameters),
  ≈ 53 s at 92.6 GFLOP/s (measured 67–75 s). Head similarity (128–130 s) is, per mapped layer pair, a bf16
  neuron similarity of ≈ 0.40 TFLOP (≈ 1.9 s at 213 GFLOP/s, × 24 pairs ≈ 45 s) and a dense Hungarian of ≈ 2.5 s
  single-threaded (≈ 60 s). The unit maps (66 s, 55 s since ded4134) carry the old weights through the residual
  maps, 1.1 TFLOP over the 24 pairs, in float32 since ded4134 (float64 before), and solve per unit. That is
  ≈ 170 s of arithmetic before anything else, so 60 s needs about 3× this core's rate: the 2-thread AMX Xeon took
  128 s.
- **First adapter, ≤ 3 GB: met since ded4134 (2.48 GB; 4.7–5.3 GB before).** The RSS read every second
  (`first_trim_1s`, `first_s14_before`) put the peak in a spike of about 3 s, 50 s into the run, while the
  `transfer_matrix` and `activations` stages ran side by side. Two causes, measured one after the other:
  - the residual fit held all 32,768 fitted rows of both embeddings in float64, their fits and differences: 2.06 GB
    in a standalone probe. 6d694ff sums its Grams and residuals over 4,096-row chunks (0.89 GB in the same probe),
    but the CLI's peak stayed at 4.78 GB (`first_chunked_fit`, its trace lost; sampled peak 4.30 GB at 50 s);
  - the streamed calibration forward made the whole input embedding real in float32 before the first layer:
    151,936 × 1,536 (0.93 GB) for the 1.5B and × 896 (0.54 GB) for the 0.5B, plus the file pages of the
    safetensors slice, which read every row between the smallest and the largest id. ded4134 reads only the rows of
    the ids the calibration texts use (and renumbers them), in windows of at most 4,096 rows. The peak is now in
    `head_similarity` (2.48 GB, reached repeatedly), and between stages the process is at 0.7–1.0 GB.
- **Marginal adapter in a fleet, ≤ 10 s: met** (5.5–6.2 s: the transfer from the stored unit maps and the write).
- **Distill-100 into the 1.5B, ≤ 5 min: missed (548–966 s).** Of that, training is 399–646 s (25 steps of 4
  examples, 16–26 s a step); the rest is the student's greedy answers on the 16 held-out prompts before and after.
  The teacher entries hold 31–62 tokens of prompt text and answer per example (the template adds a few), ≈ 5,000
  tokens an epoch; a LoRA step through the 1.5B costs ≈ 4 × 1.54·10⁹ FLOP per token (forward and the backward through the frozen weights) and the
  0.5B teacher's logits ≈ 1·10⁹ more, ≈ 36 TFLOP per adapter ≈ 170 s at 213 GFLOP/s. Short, padded batches run
  below the 1024² GEMM rate, and at load 3 on 2 cores the process had about two thirds of its core. On the AMX Xeon's 2.4 TFLOP/s the same FLOPs take
  ≈ 15 s.
- **A fleet of 5 data-free adapters, ≤ 30 min: missed (75 min; 59 min in `fleet_lean5`).** 83 % of it is the five
  distillations, one after another; the teacher answers for all five took 488 s in one call, the pair analysis
  ≈ 5 min. `fleet_lean5` (2026-12-07 13:51–14:50 UTC, code c866019: the stages' memory release, the first
  adapter's memory fixes, the float32 carry) ran beside the cross pair's GKD seeds (until 14:10) and two `.ci/run`
  runs on both cores (13:52–14:35), so its load-average readings at the start and end (1.0) understate what it
  shared; its distillations took 338–617 s (68 % of the 59 min), the teacher answers 751 s in one call (the CI
  ran beside that stage).
- **Memory:** the five-entry fleet now peaks at 17.47 GB (`fleet_lean5`; every distillation reported the same
  16.7 GB process peak, so nothing grew from entry to entry). Before, the fleet process peaked at 22.9 GB on a 24 GiB machine. The first distillation reported
  16.3 GB and the later ones 21.6–21.8 GB (the process-wide peak, so it never falls: the entry that ran first
  reported the lowest, and it rose once, in the second distillation). A
  1.5B student (6.2 GB fp32) and its 0.5B teacher (2 GB) explain about 8 GB of a distillation. What the later
  entries added was memory the earlier stages had freed and glibc's allocator kept: since 6eb8ce0 every computed
  stage returns it (`lorasuite_core/io/memory.py`, a garbage collection and `malloc_trim(0)`). Measured again
  with that (`fleet_trim`: two entries, family_relationships then arithmetic, the same recipe): the distillations
  reported 15.5 and 16.0 GB, the process peaked at 16.8 GB, and between stages it fell back to 0.8–1.6 GB; the
  second distillation's 21.6 GB became 16.0 GB. The section below has the measurements before and after. That
  first version released after every stage, and the release costs about 0.2 s with a model's objects alive (the
  garbage collection), so the 24 per-layer transfer stages took 20–35 s instead of 4.6–5.5 s (`first_trim`,
  `fleet_trim`). Since 061daac a stage is followed by a release only when it left the process at least 256 MiB
  larger: `first_mend` has the transfer back at 4.3 s, the process back at 0.7–1.0 GB between stages.
"""


def _trace_peak(entry: dict) -> str:
    trace = [r for _, r, _ in entry.get("rss_trace", []) if r is not None]
    return f"{max(trace):.2f}" if trace else "–"


def memory_section(d: dict) -> list[str]:
    """Before and after the stages give back what they freed (``io.memory``): the Qwen runs measured again under a
    label, and the in-process fleet of ``fleet_memory.py``."""
    lines = []
    runs = [(k, v) for k, v in d.items() if k.startswith(("first_", "fleet_")) and isinstance(v, dict)]
    if runs:
        lines += ["## Memory: before and after stages give back what they freed", "",
                  "Runs measured again under a label (`--label L --only first|fleet`, code = the commit the CLI ran; "
                  "`before_trim` is the code before `lorasuite_core/io/memory.py`; `s14_before` is 061daac again, measured "
                  "just before `lean`, ded4134: the calibration forward's embedding rows, the chunked residual fit and "
                  "the unit maps' float32 carry, one after the other on the same core). Peak RSS is `/usr/bin/time -v`'s; "
                  "the sampled peak is the highest of the CLI's RSS read every few seconds (the interval is a column).", "",
                  "| run | code | wall s | CPU s | peak RSS GB | sampled peak GB | sampled every | load (start → end) |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, e in runs:
            lines.append(f"| {key} | {e.get('code', '?')[:7]} | {e['wall_s']:.0f} | {e['cpu_seconds']:.0f} | "
                         f"{e['peak_rss_gb']:.2f} | {_trace_peak(e)} | {e.get('rss_every_s', 5):g} s | {e['loadavg_start'][0]:.1f} → "
                         f"{e['loadavg_end'][0]:.1f} |")
        lines.append("")
        firsts = [(k, v) for k, v in runs if k.startswith("first_") and v.get("steps")]
        if firsts:
            lines += ["Stage seconds of those first-adapter runs (from each report; some stages run side by side):", "",
                      "| run | code | " + " | ".join((*PAIR_STAGES, "transfer")) + " |",
                      "|---|---|" + "---|" * (len(PAIR_STAGES) + 1)]
            for key, e in firsts:
                lines.append(f"| {key} | {e.get('code', '?')[:7]} | " + " | ".join(
                    f"{_s(e['steps'], stage):.1f}" for stage in (*PAIR_STAGES, "transfer")) + " |")
            lines.append("")
    fleets = [(k, v) for k, v in d.items() if k.startswith("fleet") and isinstance(v, dict) and v.get("entries")]
    if fleets:
        lines += ["The process's peak RSS as each distillation reported it at its end (`light_finetune.training."
                  "peak_rss_mb`: the process-wide peak so far, so it never falls):", "",
                  "| fleet run | code | per entry (GB) |", "|---|---|---|"]
        for key, e in fleets:
            peaks = ", ".join(f"{name} {(x['light_finetune'].get('training') or {}).get('peak_rss_mb', 0) / 1000:.1f}"
                              for name, x in e["entries"].items())
            lines.append(f"| {key} | {e.get('code', 'before')[:7]} | {peaks} |")
        lines.append("")
    path = ROOT / "benchmarks" / "results" / "fleet_memory.json"
    if path.is_file():
        mem = json.loads(path.read_text())
        lines += ["In-process fleet of three distillations on the same-shape SmolLM2 pair (`benchmarks/fleet_memory.py`; "
                  "RSS in GB when each stage's line is printed, and the process's peak at the end):", "",
                  "| label | code | after teacher | after LFT 1 | after LFT 2 | after LFT 3 | peak | LFT s | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, e in mem.items():
            rows = e["rows"]
            lft = [r for r in rows if r["line"].startswith("lft ")]
            teacher = [r for r in rows if r["line"].startswith("teacher ")]
            lft_s = [r["line"].split()[2] for r in lft]
            cells = [f"{teacher[0]['rss_gb']:.2f}" if teacher else "–"] + \
                    [f"{r['rss_gb']:.2f}" for r in lft] + ["–"] * (3 - len(lft))
            lines.append(f"| {label} | {e['code'][:7]} | " + " | ".join(cells) + f" | {rows[-1]['peak_gb']:.2f} | "
                         + ", ".join(lft_s) + f" | {e['loadavg_start'][0]:.1f} → {e['loadavg_end'][0]:.1f} |")
        lines.append("")
    return lines


def markdown() -> str:
    d = json.loads(RESULTS.read_text())
    m, first, fleet = d.get("machine", {}), d.get("first"), d.get("fleet")
    lines = ["# Fleet economics on the Qwen pair (issue 23)", "",
             "Generated by `benchmarks/fleet_economics.py --markdown` from `benchmarks/results/fleet_economics.json`; "
             "the runs are defined in the script's docstring.", "",
             f"- command: `{d.get('command', '?')}`",
             f"- CPU: {m.get('cpu', '?')} ({m.get('cpus', '?')} CPUs, shared with one other 1-thread benchmark), "
             f"torch threads {m.get('threads', '?')}, 1024² GEMM {m.get('gemm_1024_gflops', '?')} GFLOP/s, bf16 "
             f"matmul {m.get('bf16_matmul', '?')} (training compute dtype {m.get('training_compute_dtype', '?')}), "
             f"torch {m.get('torch', '?')}, {m.get('date', '?')}", ""]
    rows = []
    if first:
        steps = first.get("steps") or {}
        rows.append(f"| first adapter, transfer only, fresh store (`lorasuite migrate`) | {TARGETS['first']} | "
                    f"{first['wall_s']:.0f} s wall, {first['cpu_seconds']:.0f} s CPU, {first['peak_rss_gb']} GB "
                    f"(load {first['loadavg_start'][0]:.1f} → {first['loadavg_end'][0]:.1f}); pair stages "
                    f"{_s(steps, *PAIR_STAGES):.0f} s summed (some run side by side), transfer + write "
                    f"{_s(steps, 'transfer', 'write'):.1f} s |")
    latest = d.get(LATEST_FIRST)
    if latest:
        steps = latest.get("steps") or {}
        rows.append(f"| the same, code {latest.get('code', '?')[:7]} (`{LATEST_FIRST}`) | {TARGETS['first']} | "
                    f"{latest['wall_s']:.0f} s wall, {latest['cpu_seconds']:.0f} s CPU, {latest['peak_rss_gb']} GB "
                    f"(load {latest['loadavg_start'][0]:.1f} → {latest['loadavg_end'][0]:.1f}); pair stages "
                    f"{_s(steps, *PAIR_STAGES):.0f} s summed, transfer + write {_s(steps, 'transfer', 'write'):.1f} s |")
    if fleet:
        entries = fleet.get("entries", {})
        marginal = [_s(e["steps"], "transfer", "write") for e in entries.values()]
        distill = [_s(e["steps"], "lft") for e in entries.values()]
        teacher = [_s(e["steps"], "teacher") for e in entries.values()]
        rows += [f"| marginal adapter in a fleet (its transfer + write) | {TARGETS['marginal']} | "
                 + ", ".join(f"{x:.1f}" for x in marginal) + " s |",
                 f"| transfer + distill-100 into the 1.5B (an entry's distillation) | {TARGETS['distill']} | "
                 + ", ".join(f"{x:.0f}" for x in distill) + " s (teacher answers: one call for the five, "
                 f"{sum(teacher):.0f} s in all) |",
                 f"| a fleet of 5 data-free adapters, fresh store (`lorasuite migrate-fleet`) | {TARGETS['fleet']} | "
                 f"{fleet['wall_s']:.0f} s wall ({fleet['wall_s'] / 60:.1f} min), {fleet['cpu_seconds']:.0f} s CPU, "
                 f"peak RSS {fleet['peak_rss_gb']} GB (load {fleet['loadavg_start'][0]:.1f} → "
                 f"{fleet['loadavg_end'][0]:.1f}) |"]
    latest = d.get(LATEST_FLEET)
    if latest and latest.get("entries"):
        entries = latest["entries"]
        rows += [f"| the same fleet, code {latest.get('code', '?')[:7]} (`{LATEST_FLEET}`) | {TARGETS['fleet']} | "
                 f"{latest['wall_s']:.0f} s wall ({latest['wall_s'] / 60:.1f} min), {latest['cpu_seconds']:.0f} s CPU, "
                 f"peak RSS {latest['peak_rss_gb']} GB (load {latest['loadavg_start'][0]:.1f} → "
                 f"{latest['loadavg_end'][0]:.1f}); marginal transfer + write "
                 + ", ".join(f"{_s(e['steps'], 'transfer', 'write'):.1f}" for e in entries.values())
                 + " s; distillations " + ", ".join(f"{_s(e['steps'], 'lft'):.0f}" for e in entries.values()) + " s |"]
    lines += ["| target | issue | measured |", "|---|---|---|", *rows, ""]
    if fleet:
        lines += ["Per entry of the fleet (seconds; `r` = reused from the store):", "",
                  "| entry | " + " | ".join((*PAIR_STAGES, "transfer", "write", "teacher", "lft")) + " |",
                  "|---|" + "---|" * (len(PAIR_STAGES) + 4)]
        for name, e in fleet.get("entries", {}).items():
            cells = [f"{x['seconds']:.1f}{' r' if x.get('cache') == 'reused' else ''}" if x else "–"
                     for x in (e["steps"].get(k) for k in (*PAIR_STAGES, "transfer", "write", "teacher", "lft"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "The pair stages ran once (the fleet's first step) and are listed under every entry; the "
                  "distillations ran one after another.", "", LIMITS]
    lines += memory_section(d)
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "FLEET_ECONOMICS.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "fleet-economics"))
    parser.add_argument("--label", default="",
                        help="measure the first adapter and the fleet again, as first_LABEL and fleet_LABEL, with the "
                             "CLI's RSS every second and at each stage line (no label: the first measurement's keys)")
    parser.add_argument("--only", choices=["first", "fleet"], help="run only this measurement")
    parser.add_argument("--fleet-skills", nargs="+", choices=SKILLS, default=list(SKILLS),
                        help="the fleet's entries (default: all five)")
    parser.add_argument("--markdown", action="store_true", help="write benchmarks/FLEET_ECONOMICS.md and stop")
    args = parser.parse_args()
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    args.command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/fleet_economics.py "
                    + shlex.join(sys.argv[1:]))
    if args.markdown:
        print(markdown())
        return
    Run(args).run()


if __name__ == "__main__":
    main()
