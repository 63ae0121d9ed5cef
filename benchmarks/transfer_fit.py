"""The transfer alone, its residual maps fitted on the weights (the default) or on activations, on every skill of
the skill fleet: fidelity and accuracy against issue 22's targets (item 2).

Targets: F >= 0.5 before any LFT; transfer-only accuracy at least halfway from the bare new model to the old
adapter on at least 2 skills.

Stages (in the pair's skill-fleet work directory: its old adapters and its store; results merged into
``benchmarks/results/transfer_fit_<pair>.json`` after each, a rerun resumes):

  fleet/<fit>     ONE ``lorasuite migrate-fleet`` run over every skill's old adapter: transfer only, fidelity on,
                  ``analysis: {transfer_fit: <fit>}`` on the built-in calibration text (one pair analysis for the
                  fleet, as a user runs it).  Fidelity reads the first 16 prompts of each skill's test set: every
                  entry gets ``eval_data: task:SKILL:test:100`` with ``eval_samples: 16`` and ``gate_prompts: 16``
                  (fidelity's held-out prompts are the evaluation data's first ``gate_prompts``), so the fleet also
                  evaluates its rows on those 16 problems (recorded, not used).  The weights fit reuses the skill
                  fleet's pair analysis and transfer from the store; its published adapters must equal the skill
                  fleet's ``transfer`` row (checked where that row's adapter is still kept:
                  ``same_tensors_as_transfer_row``).
  <skill>/eval/transfer_<fit>/s0   the published adapter on ``task:SKILL:test:100`` (weights: the skill fleet's
                  ``transfer`` row's result, reused when the tensors are equal; evaluated again where that adapter
                  is gone, ``same_as_transfer_row`` then compares the per-problem results)

The report takes the old adapter, bare new model and transfer rows from ``skill_fleet_<pair>.json``.

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/transfer_fit.py --pair cross \\
      --workdir /work/wt/skills/runs/skill-fleet
  .venv/bin/python benchmarks/transfer_fit.py --markdown          # benchmarks/TRANSFER_FIT.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import merge_json  # noqa: E402
from skill_fleet import HELD, Run, machine, results_path as fleet_results, run_cli, same_tensors  # noqa: E402

FITS = ("weights", "activations")


def results_path(pair: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"transfer_fit_{pair}.json"


def _code() -> str:
    """The checkout's commit, marked where files differ from it (``git status --porcelain``, untracked files aside)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.rstrip("\n")

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if not line.startswith("??")]
    return git("rev-parse", "--short", "HEAD") + (f" + changes to {', '.join(changed)}" if changed else "")


class FitRun(Run):
    def run(self) -> None:
        skills = self.args.skills
        self.stages.setdefault("machine", machine(self.args.threads))
        merge_json(self.path, {"stages": self.stages, "command": self.args.command, "pair": self.args.pair,
                               "skills": skills})
        fleet = json.loads(fleet_results(self.args.pair).read_text())["stages"]
        for fit in self.args.fits:
            name = fit + (f"-{self.args.label}" if self.args.label else "")
            out = self.work / f"transfer-fit-{name}"
            manifest = self.work / f"fleet-fit-{name}.json"
            manifest.write_text(json.dumps({
                "old_model": self.old, "new_model": self.new, "output_root": str(out),
                "defaults": {"lft": False, "fidelity": True, "eval_samples": HELD, "gate_prompts": HELD},
                "analysis": {"transfer_fit": fit},
                "adapters": [{"name": s, "adapter": self.adapter(s, "old_adapter"),
                              "eval_data": f"task:{s}:test:100"} for s in skills]}, indent=2))
            run = self.record(f"fleet/{name}", run_cli, ["migrate-fleet", "--manifest", str(manifest), "--cache-root",
                                                        self.store, "--overwrite"], self.args.threads)
            if "code" not in run:
                run.update(code=_code(), benchmark_command=self.args.command)
            for skill in skills:
                report = json.loads((out / skill / "migration_report.json").read_text())
                run.setdefault("fidelity", {})[skill] = report.get("fidelity")
                earlier = self.work / "transfer" / skill          # the skill fleet's transfer row, where still kept
                if fit == "weights" and (earlier / "adapter_model.safetensors").is_file():
                    run.setdefault("same_tensors_as_transfer_row", {})[skill] = same_tensors(str(out / skill),
                                                                                             str(earlier))
            merge_json(self.path, {"stages": self.stages})
            for skill in skills:
                key = f"{skill}/eval/transfer/s0"
                if run.get("same_tensors_as_transfer_row", {}).get(skill) and key in fleet:
                    self.stages[f"{skill}/eval/transfer_{name}/s0"] = {**fleet[key], "reused_from": key}
                    merge_json(self.path, {"stages": self.stages})
                    continue
                done = self.evaluate(skill, f"transfer_{name}", self.new, str(out / skill))
                if fit == "weights" and key in fleet and "same_as_transfer_row" not in done:
                    done["same_as_transfer_row"] = done["correct_mask"] == fleet[key].get("correct_mask")
                    merge_json(self.path, {"stages": self.stages})


# ----------------------------------------------------------------------------- the report

def write_markdown(pairs: list[str]) -> str:
    from skill_fleet_report import bootstrap, masks

    out = ["# The transfer alone, fitted on weights or on activations (issue 22, item 2)", "",
           "Written by `benchmarks/transfer_fit.py` (its docstring has the stages) from "
           "`benchmarks/results/transfer_fit_<pair>.json` and the pair's `skill_fleet_<pair>.json` (old adapter and "
           "bare new model rows). Targets: F ≥ 0.5 before any LFT; transfer-only accuracy at least halfway from the "
           "bare new model to the old adapter on at least 2 skills.", ""]
    for pair in pairs:
        path = results_path(pair)
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        stages, m = data["stages"], data["stages"]["machine"]
        fleet = json.loads(fleet_results(pair).read_text())["stages"]
        out += [f"## Pair `{pair}`", "",
                f"- CPU: {m['cpu']} ({m['cpus']} CPUs, shared), torch threads {m['threads']}, 1024² GEMM "
                f"{m['gemm_1024_gflops']} GFLOP/s, torch {m['torch']}, {m['date']}.", ""]
        names = sorted((k.split("/", 1)[1] for k in stages if k.startswith("fleet/")),
                       key=lambda n: (FITS.index(n.split("-")[0]), n))          # weights first, then activations
        for name in names:
            run = stages[f"fleet/{name}"]
            out.append(f"- `{name}` (code {run.get('code', '?')}; `{run.get('benchmark_command', data['command'])}`): "
                       f"`migrate-fleet` wall {run['seconds']:.0f} s, CPU {run['cpu_seconds']:.0f} s, peak RSS "
                       f"{run['peak_rss_gb']} GB.")
        out += ["", "Accuracy on the 100 test problems [95% bootstrap over problems]; F on the first 16.",
                "", "| skill | old adapter | bare new | halfway mark | " + " | ".join(
                    f"transfer, {n}" for n in names) + " | " + " | ".join(f"F {n}" for n in names)
                + " | A1 / B0 (nats per char) |", "|---" * (4 + 2 * len(names) + 1) + "|"]
        for skill in data["skills"]:
            acc = {}
            for row, source in (("old_adapter", fleet), ("bare_new", fleet),
                                *((f"transfer_{n}", stages) for n in names)):
                m_ = masks(source, skill, row)
                if m_:
                    lo, hi = bootstrap(m_)
                    acc[row] = f"{m_[0].mean():.2f} [{lo:.2f}, {hi:.2f}]"
            fid = {n: ((stages.get(f"fleet/{n}") or {}).get("fidelity") or {}).get(skill) for n in names}
            f = [(v or {}).get("fidelity", {}).get("transfer") for v in fid.values()]
            losses = next((v for v in fid.values() if v), None)
            half = "–"
            if masks(fleet, skill, "old_adapter") and masks(fleet, skill, "bare_new"):
                o, b = (masks(fleet, skill, r)[0].mean() for r in ("old_adapter", "bare_new"))
                half = f"{(o + b) / 2:.2f}"
            tail = f"{losses['teacher']:.3f} / {losses['new']:.3f}" if losses else "–"
            out.append(f"| {skill} | {acc.get('old_adapter', '–')} | {acc.get('bare_new', '–')} | {half} | "
                       + " | ".join(acc.get(f"transfer_{n}", "–") for n in names) + " | "
                       + " | ".join("–" if x is None else f"{x:.3f}" for x in f) + f" | {tail} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=("cross", "shape", "qwen"), default="cross")
    parser.add_argument("--skills", nargs="+", default=["arithmetic", "family_relationships", "knowledge", "chain_sum"])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "skill-fleet"),
                        help="the skill-fleet run's work directory (its old adapters and store)")
    parser.add_argument("--fits", nargs="+", choices=FITS, default=list(FITS))
    parser.add_argument("--label", help="suffix of the stages, rows and outputs (another code version of a fit)")
    parser.add_argument("--markdown", action="store_true", help="write benchmarks/TRANSFER_FIT.md and stop")
    args = parser.parse_args()
    if args.markdown:
        text = write_markdown(["cross", "shape", "qwen"])
        (ROOT / "benchmarks" / "TRANSFER_FIT.md").write_text(text + "\n")
        print(text)
        return
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    args.command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/transfer_fit.py "
                    + shlex.join(sys.argv[1:]))
    FitRun(Namespace(pair=args.pair, results=str(results_path(args.pair)), old_model=None, new_model=None,
                     workdir=args.workdir, threads=args.threads, skills=args.skills, command=args.command,
                     fits=args.fits, label=args.label)).run()


if __name__ == "__main__":
    main()
