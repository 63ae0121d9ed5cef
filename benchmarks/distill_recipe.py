"""A stronger data-free recipe against the skill fleet's rows (issue 22, item 3): more prompts, epochs with early
stopping on held-out teacher agreement, prompt de-duplication.

Pair: ``cross`` SmolLM2-135M-Instruct -> Gemma-3-270M, the skill fleet's (``benchmarks/skill_fleet.py``); skills
arithmetic and family_relationships by default (``--skills``; chain_sum ran later); the same old adapters
(``--fleet-workdir``, read only) and test problems (``task:NAME:test:100`` at seed 0).

Row ``recipe`` (seeds 0, 1, 2): transfer + distillation through the stage graph (``migrate_in_process``, as the
fleet's ``distill`` row) with ``lft_mode: distill``, prompts ``task:NAME:train:N+H`` without answers (N = 200
trained on, H = 16 held out -- the fleet's held-out count), ``lft_dedup`` on, up to ``lft_epochs`` 3 with
``lft_patience`` 1 (after every epoch the held-out agreement with the teacher, ties broken by the held-out
distillation loss; the best epoch is published); learning rate, KL weight and everything else at the defaults.  The
seed also draws the prompts (as in the fleet).  The stage store is this run's own (``--workdir``), seeded with a copy of
the fleet's pair-analysis and transfer entries, so no pair stage is recomputed.

The rows it is compared with are the skill fleet's, read from its results (``--baseline``; a copy of the stages used
is kept in this run's JSON under ``baseline``, so the Markdown renders from committed files): old adapter, transfer
only, transfer + distill-100 (100 prompts, 1 epoch: today's defaults), fresh LoRA + distill-100, vanilla LoRA-100.
Statistics as the fleet's (``skill_fleet_report``): a bootstrap over seeds x problems, paired by problem.

Row ``recipe_sc`` (``--variant recipe_sc``; seeds 0, 1, 2): the recipe with the teacher's self-consistency filter,
``lft_consistency`` K = 4 (``lorasuite_core/training/consistency.py``): the teacher also samples 4 answers per training
prompt at temperature 0.7 and a prompt trains only where at least 2 of them give its greedy answer.  Same seeds, so
the same 216 prompts are drawn and held out as in ``recipe``: the paired difference ``recipe_sc - recipe`` is the
filter's effect.

Targets (issue 22): data-free >= 80% of vanilla LoRA-100 on every skill; above fresh distillation outside the noise
(the bootstrap interval of recipe - fresh_distill above 0).

Cost: every stage in its own process (``run_child``): wall and CPU seconds, the load average.  Results are merged
into ``benchmarks/results/distill_recipe_cross.json`` after every stage; a rerun skips recorded stages.

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/distill_recipe.py &
  .venv/bin/python benchmarks/distill_recipe.py --markdown --baseline PATH   # benchmarks/DISTILL_RECIPE.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import merge_json  # noqa: E402
from migration_benchmark import run_child, stage_graph_migrate  # noqa: E402
from skill_fleet import HELD, PAIRS, SEEDS, SKILLS, TEST_SEED, machine, stage_eval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distill_recipe_cross.json"
FLEET_WORKDIR = Path("/work/wt/skills/runs/skill-fleet/cross")
RECIPE = {"n": 200, "epochs": 3, "patience": 1, "dedup": True}
#: row -> options on top of the recipe's
VARIANTS = {"recipe": {}, "recipe_sc": {"lft_consistency": 4}}
BASELINE_ROWS = ("old_adapter", "bare_new", "transfer", "distill", "fresh_distill", "vanilla")


def recipe_options(skill: str, seed: int, variant: str = "recipe") -> dict:
    return {**VARIANTS[variant], "lft_mode": "distill", "lft_prompts": f"task:{skill}:train:{RECIPE['n'] + HELD}",
            "lft_samples": RECIPE["n"], "gate_prompts": HELD, "seed": seed, "fidelity": False,
            "lft_epochs": RECIPE["epochs"], "lft_patience": RECIPE["patience"], "lft_dedup": RECIPE["dedup"]}


class Run:
    def __init__(self, args):
        self.args, self.path = args, Path(args.results)
        from lorasuite_core.models.model_fetch import fetch_model

        self.old, self.new = (str(fetch_model(name)) for name in PAIRS["cross"])   # the fleet's (cached) copies
        self.store = str(Path(args.workdir) / "store")
        self.stages: dict = json.loads(self.path.read_text()).get("stages", {}) if self.path.is_file() else {}

    def record(self, name: str, fn, *fn_args) -> dict:
        if name in self.stages:
            return self.stages[name]
        print(f"[distill-recipe] {name} ...", flush=True)
        result = run_child(fn, *fn_args)
        self.stages[name] = result
        merge_json(self.path, {"stages": self.stages})
        print(f"[distill-recipe] {name}: " + json.dumps({k: result.get(k) for k in ("accuracy", "seconds",
                                                                                  "cpu_seconds")}), flush=True)
        return result

    def recipe(self, skill: str, seed: int, row: str) -> None:
        out = str(Path(self.args.workdir) / "adapters" / skill / f"{row}-s{seed}")
        old_adapter = str(Path(self.args.fleet_workdir) / "adapters" / skill / "old_adapter-s0")
        self.record(f"{skill}/train/{row}/s{seed}", stage_graph_migrate, self.old, self.new, old_adapter, out,
                    self.store, recipe_options(skill, seed, row), {})
        self.record(f"{skill}/eval/{row}/s{seed}", stage_eval, self.new, out, f"task:{skill}:test:{SKILLS[skill]['test']}",
                    TEST_SEED)

    def run(self) -> None:
        before = json.loads(self.path.read_text()) if self.path.is_file() else {}
        commands = before.get("commands", [before["command"]] if "command" in before else [])
        merge_json(self.path, {"command": self.args.command, "pair": "cross", "models": list(PAIRS["cross"]),
                               "commands": list(dict.fromkeys([*commands, self.args.command])),
                               "skills": {**before.get("skills", {}), **{s: SKILLS[s] for s in self.args.skills}},
                               "recipe": RECIPE, "variants": VARIANTS,
                               "held_out": HELD, "test_seed": TEST_SEED})
        if "machine" not in json.loads(self.path.read_text()):
            merge_json(self.path, {"machine": run_child(machine, self.args.threads)})
        rows = [(skill, seed) for seed in SEEDS for skill in self.args.skills]
        if self.args.rows:         # a second process on a share of the rows, into its own --results
            rows = [(row.rsplit(":", 1)[0], int(row.rsplit(":", 1)[1])) for row in self.args.rows]
        for skill, seed in rows:
            self.recipe(skill, seed, self.args.variant)


# ----------------------------------------------------------------------------- the report

def _epochs(stages: dict, skill: str, row: str = "recipe") -> list[str]:
    lines = []
    for seed in SEEDS:
        train = stages.get(f"{skill}/train/{row}/s{seed}")
        if not train:
            continue
        lft = train.get("light_finetune") or {}
        stop = lft.get("early_stopping") or {}
        per_epoch = ", ".join(f"{e['agreement']:.3f} (loss {e['heldout_loss']:.3f})" for e in stop.get("epochs", []))
        lines.append(f"| {seed} | {lft.get('n_prompts', '–')} | {lft.get('duplicate_prompts_dropped', '–')} | "
                     f"{lft.get('teacher_agreement_before', float('nan')):.3f} | {per_epoch or '–'} | "
                     f"{stop.get('best_epoch', '–')} | {stop.get('epochs_run', '–')} | "
                     f"{lft.get('teacher_agreement_after', float('nan')):.3f} |")
    if not lines:
        return []
    return [f"Early stopping per seed, `{row}` (held-out agreement with the teacher after each epoch):", "",
            "| seed | prompts trained | duplicates dropped | agreement before | agreement per epoch | best epoch | "
            "epochs run | agreement published |", "|---|---|---|---|---|---|---|---|", *lines, ""]


def _paired_line(stages: dict, skill: str, row: str, other: str, what: str) -> str | None:
    """``row − other`` on the seeds both have, paired by seed and problem: the difference of means, the bootstrap
    over seeds x problems and the pooled paired Newcombe interval (None: no seed in common)."""
    from skill_fleet_report import bootstrap, masks, pooled_newcombe

    a, b = masks(stages, skill, row), masks(stages, skill, other)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ma, mb = {s: a[s] for s in common}, {s: b[s] for s in common}
    d = statistics.mean(float(v.mean()) for v in ma.values()) - statistics.mean(float(v.mean()) for v in mb.values())
    low, high = bootstrap(ma, mb)
    pooled = pooled_newcombe(ma, mb)
    extra = f"; pooled paired Newcombe [{pooled[1]:+.3f}, {pooled[2]:+.3f}]" if pooled else ""
    return f"- {row} − {other} ({what}seeds {common}, paired): {d:+.3f}, bootstrap [{low:+.3f}, {high:+.3f}]{extra}"


def write_markdown(path: Path, baseline: Path | None, merge: list[str] = ()) -> str:
    from skill_fleet_report import LABELS, bootstrap, masks, row_summary

    data = json.loads(path.read_text())
    for part in merge:             # the stages (skills, commands) a second process recorded into its own file
        other = json.loads(Path(part).read_text())
        data = merge_json(path, {"stages": {**other.get("stages", {}), **data.get("stages", {})},
                                 "skills": {**data.get("skills", {}), **other.get("skills", {})},
                                 "commands": list(dict.fromkeys([*data.get("commands", []),
                                                                 *other.get("commands", [])]))})
    if baseline is not None:       # keep a copy of the fleet's stages this report reads
        fleet = json.loads(baseline.read_text())["stages"]
        kept = {k: v for k, v in fleet.items() if k.split("/")[0] in data["skills"]
                and (k.split("/")[1] == "eval" and k.split("/")[2] in BASELINE_ROWS
                     or k.split("/")[1] == "train" and k.split("/")[2].startswith(("distill", "fresh_distill",
                                                                                      "vanilla")))}
        data = merge_json(path, {"baseline": {"source": str(baseline), "stages": kept}})
    stages = {**data.get("baseline", {}).get("stages", {}), **data.get("stages", {})}
    labels = {**LABELS, "recipe": f"transfer + distill, {RECIPE['n']} prompts, ≤ {RECIPE['epochs']} epochs, "
                                  f"patience {RECIPE['patience']}, dedup (no labels)",
              "recipe_sc": "the recipe + the teacher's self-consistency filter, K = 4 (no labels)"}
    m = data.get("machine", {})
    loads = [st["loadavg_start"][0] for k, st in data.get("stages", {}).items() if st.get("loadavg_start")]
    lines = ["# A stronger data-free recipe (cross pair)", "",
             "Generated by `benchmarks/distill_recipe.py --markdown` from "
             f"`benchmarks/results/{path.name}`; rows, seeds and statistics in the script's docstring. The "
             "comparison rows are the skill fleet's (`benchmarks/skill_fleet.py`), copied into the JSON's `baseline` "
             f"from `{data.get('baseline', {}).get('source', '?')}`.", "",
             *([f"- command: `{data.get('command', '?')}`"] if len(data.get("commands", [])) < 2 else
               ["- commands (every run that wrote into this file): "
                + "; ".join(f"`{c}`" for c in data["commands"])]),
             f"- CPU: {m.get('cpu', '?')} ({m.get('cpus', '?')} CPUs, shared with other jobs), torch threads per stage "
             f"{m.get('threads', '?')}, 1024² GEMM {m.get('gemm_1024_gflops', '?')} GFLOP/s at the start, training "
             f"compute dtype {m.get('training_compute_dtype', '?')}, torch {m.get('torch', '?')}, started "
             f"{m.get('date', '?')}",
             (f"- load average (1 min) at the start of this run's stages: {min(loads):.1f}–{max(loads):.1f}; wall "
              "seconds depend on it, CPU seconds much less") if loads else "- load average: –", ""]
    for skill in data["skills"]:
        lines += [f"## {skill}", "", "| row | seeds | mean accuracy | per seed | 95% interval | train wall s | "
                  "train CPU s |", "|---|---|---|---|---|---|---|"]
        for row in (*BASELINE_ROWS, *VARIANTS):
            s = row_summary(stages, skill, row)
            if s:
                fmt = lambda x: "–" if x is None else f"{x:.0f}"
                lines.append(f"| {labels[row]} | {len(s['seeds'])} | {s['mean']:.3f} | "
                             f"{', '.join(f'{a:.2f}' for a in s['accs'])} | [{s['low']:.3f}, {s['high']:.3f}] | "
                             f"{fmt(s['wall'])} | {fmt(s['cpu'])} |")
        recipe, vanilla = masks(stages, skill, "recipe"), masks(stages, skill, "vanilla")
        lines.append("")
        pairs = [("recipe", other, "") for other in ("distill", "fresh_distill", "vanilla")]
        for row, other, what in [*pairs, ("recipe_sc", "recipe", "the filter's effect; ")]:
            line = _paired_line(stages, skill, row, other, what)
            if line:
                lines.append(line)
        if recipe and vanilla:
            r = statistics.mean(float(v.mean()) for v in recipe.values())
            v = statistics.mean(float(v.mean()) for v in vanilla.values())
            fresh = masks(stages, skill, "fresh_distill")
            both = sorted(set(recipe) & set(fresh))
            above = bootstrap({s: recipe[s] for s in both}, {s: fresh[s] for s in both})[0] > 0 if both else None
            lines += ["", f"Targets: recipe / vanilla LoRA-100 = {r / v:.2f} (means over their seeds; target ≥ 0.80: "
                          f"{'met' if r >= 0.8 * v else 'missed'}); above fresh distillation outside the noise: "
                          f"{'met' if above else 'missed' if above is not None else '–'} (the paired bootstrap's lower end above 0)."]
        lines += ["", *_epochs(stages, skill), *_epochs(stages, skill, "recipe_sc")]
    started = [v for v in VARIANTS if any(k.split("/")[2] == v for k in stages if k.count("/") == 3)]
    missing = [f"{s}/{v}/s{seed}" for v in started for s in data["skills"] for seed in SEEDS
               if f"{s}/eval/{v}/s{seed}" not in stages]
    if missing:
        lines += ["## Not measured (yet)", "", "Rows without a result: " + ", ".join(missing) + ".", ""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "DISTILL_RECIPE.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skills", nargs="+", choices=sorted(SKILLS), default=["arithmetic", "family_relationships"])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "distill-recipe" / "cross"))
    parser.add_argument("--fleet-workdir", default=str(FLEET_WORKDIR), help="the skill fleet's work directory (its "
                                                                            "old adapters; read only)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--markdown", action="store_true", help="render benchmarks/DISTILL_RECIPE.md and stop")
    parser.add_argument("--rows", nargs="+", help="SKILL:SEED rows to run, in this order (default: every skill "
                                                   "at seed 0, then 1, then 2)")
    parser.add_argument("--merge", nargs="+", default=[], help="--markdown: first merge the stages of these "
                                                               "results files (another process's --results)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="recipe", help="the row to run")
    parser.add_argument("--baseline", help="the skill fleet's results JSON (default: the copy already in --results)")
    args = parser.parse_args()
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    args.command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/distill_recipe.py "
                    + shlex.join(sys.argv[1:]))
    if args.markdown:
        print(write_markdown(Path(args.results), Path(args.baseline) if args.baseline else None, args.merge))
        return
    Run(args).run()


if __name__ == "__main__":
    main()
