"""Greedy generation in bf16 against float32 (issue 23, item 1): the teacher's answers, their cost, and one
benchmark row at both dtypes.

The pipeline's greedy generation (the teacher stage's answers and self-consistency samples, distillation's held-out
student answers, the quality gate, ``--route auto``) runs in ``generation_dtype``: "auto" is bf16 where the hardware
multiplies in bf16 (AVX512-BF16/AMX CPUs, bf16 GPUs), as evaluation already did.  Greedy answers are not an exact
path, so the question is parity: do bf16 answers train an adapter as good as float32 answers do?

Stages (each in a child process, at ``LORASUITE_BENCH_THREADS`` torch threads; results merged into
``benchmarks/results/generation_dtype_<pair>.json`` after each, a rerun resumes):

  teacher/<dtype>/s<seed>   the old model + the skill's old adapter (the skill-fleet run's ``old_adapter-s0``) answer
                            the distill row's prompts, ``task:SKILL:train:116`` at the seed, as the teacher stage
                            does (``load_for_generation`` in the dtype, ``greedy_completions``, batches of 16, the
                            skill's budget and stop rule): generation seconds (the load apart), the answers, and
                            the teacher's accuracy against the prompts' gold answers
  train/distill-<dtype>/s<seed>  the skill fleet's distill row (transfer + distill-100 through the stage graph,
                            16 prompts held out, fidelity off) with ``generation_dtype`` <dtype>, in the skill-fleet
                            run's store (the pair analysis and the transfer are reused; the teacher, the
                            distillation and its held-out answers are computed again, keyed by the dtype)
  eval/distill-<dtype>/s<seed>   that adapter on ``task:SKILL:test:100`` (evaluation's own dtype, the same for both)

``--no-distill`` runs the teacher stages only (the Qwen pair, where one distillation costs ~10 CPU minutes).

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/generation_dtype.py --pair cross \\
      --workdir /work/wt/skills/runs/skill-fleet
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/generation_dtype.py --pair qwen --no-distill \\
      --workdir /work/wt/qwen/runs/B --skill chain_sum
  .venv/bin/python benchmarks/generation_dtype.py --markdown          # benchmarks/GENERATION_DTYPE.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import merge_json  # noqa: E402
from migration_benchmark import _threads, paired_interval, run_child, stage_graph_migrate  # noqa: E402
from skill_fleet import HELD, N_100, SEEDS, Run, machine  # noqa: E402

DTYPES = ("float32", "bfloat16")
#: Teacher-only variants beyond the pipeline's options: "autocast", float32 weights with bf16 products
#: (``torch.autocast``), as training runs; measured to decide whether the pipeline should offer it.
TEACHER_ONLY = ("autocast",)


def results_path(pair: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"generation_dtype_{pair}.json"


def stage_teacher(old_dir: str, adapter_dir: str, spec: str, seed: int, dtype: str) -> dict:
    """The teacher stage's generation for one adapter in ``dtype``, timed without the load."""
    _threads()
    from lorasuite_core.pipeline.teacher_stage import GENERATION
    from lorasuite_core.training.agreement import accuracy
    from lorasuite_core.training.completions import greedy_completions
    from lorasuite_core.training.evaluation import load_for_generation
    from lorasuite_core.training.prompts import prompts_from_samples
    from lorasuite_core.training.samples import load_samples

    samples = load_samples(spec, None, split="train", seed=seed)
    prompts = prompts_from_samples(samples)
    start = time.perf_counter()
    model, tokenizer = load_for_generation(old_dir, adapter_dir, dtype="float32" if dtype == "autocast" else dtype)
    loaded, cpu = time.perf_counter(), time.process_time()
    import torch

    with (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "autocast" else contextlib.nullcontext()):
        completions = greedy_completions(model, tokenizer, prompts, **GENERATION)
    done = time.perf_counter()
    return {"dtype": dtype, "n": len(prompts), "load_seconds": loaded - start, "generation_seconds": done - loaded,
            "generation_cpu_seconds": time.process_time() - cpu, "seconds": done - start,
            "teacher_accuracy": accuracy(completions, samples),
            "texts": [c.text for c in completions], "tokens": sum(len(c.ids) for c in completions),
            "tasks": [p.task for p in prompts]}


class DtypeRun(Run):
    """The skill fleet's run (its adapters, store and records) with this benchmark's stages and results file."""

    def run(self) -> None:
        skill = self.args.skill
        self.stages.setdefault("machine", machine(self.args.threads))
        before = json.loads(self.path.read_text()).get("commands", []) if self.path.is_file() else []
        merge_json(self.path, {"stages": self.stages, "command": self.args.command, "pair": self.args.pair,
                               "skill": skill, "commands": list(dict.fromkeys([*before, self.args.command]))})
        old_adapter = self.adapter(skill, "old_adapter")
        if not Path(old_adapter, "adapter_model.safetensors").is_file():
            raise SystemExit(f"no old adapter at {old_adapter}: run benchmarks/skill_fleet.py --pair "
                             f"{self.args.pair} first (--workdir)")
        spec = f"task:{skill}:train:{N_100 + HELD}"
        for seed in SEEDS[: self.args.seeds]:
            for dtype in (*DTYPES, *(TEACHER_ONLY if self.args.autocast else ())):
                self.record(f"teacher/{dtype}/s{seed}", stage_teacher, self.old, old_adapter, spec, seed, dtype)
        if self.args.no_distill:
            return
        for seed in SEEDS[: self.args.seeds]:
            for dtype in DTYPES:
                row = f"distill-{dtype}"
                out = self.adapter(skill, row, seed)
                self.record(f"{skill}/train/{row}/s{seed}", stage_graph_migrate, self.old, self.new, old_adapter,
                            out, self.store, {**self.distill_options(skill, seed), "generation_dtype": dtype}, {})
                self.evaluate(skill, row, self.new, out, seed)


# ----------------------------------------------------------------------------- the report

def teacher_lines(stages: dict, variant: str = "bfloat16") -> list[str]:
    """The teacher's answers in ``variant`` against float32, per seed: time, same answers, accuracy."""
    from lorasuite_core.training.agreement import answers_agree

    lines = [f"| seed | prompts | float32 gen. s (CPU s) | {variant} gen. s (CPU s) | speed-up (CPU) | same text "
             f"| same answer (skill's scorer) | teacher accuracy float32 / {variant} |", "|---|---|---|---|---|---|---|---|"]
    totals = [0, 0, 0, 0.0, 0.0, 0.0, 0.0]
    for seed in SEEDS:
        a, b = stages.get(f"teacher/float32/s{seed}"), stages.get(f"teacher/{variant}/s{seed}")
        if not (a and b):
            continue
        same = sum(x == y for x, y in zip(a["texts"], b["texts"], strict=True))
        agree = sum(answers_agree(y, x, t) for x, y, t in zip(a["texts"], b["texts"], a["tasks"], strict=True))
        n = a["n"]
        totals = [totals[0] + n, totals[1] + same, totals[2] + agree, totals[3] + a["generation_cpu_seconds"],
                  totals[4] + b["generation_cpu_seconds"], totals[5] + a["teacher_accuracy"] * n,
                  totals[6] + b["teacher_accuracy"] * n]
        lines.append(f"| {seed} | {n} | {a['generation_seconds']:.1f} ({a['generation_cpu_seconds']:.1f}) | "
                     f"{b['generation_seconds']:.1f} ({b['generation_cpu_seconds']:.1f}) | "
                     f"{a['generation_seconds'] / b['generation_seconds']:.2f}x "
                     f"({a['generation_cpu_seconds'] / b['generation_cpu_seconds']:.2f}x) | {same}/{n} | {agree}/{n} | "
                     f"{a['teacher_accuracy']:.3f} / {b['teacher_accuracy']:.3f} |")
    if totals[0]:
        n, same, agree, fp32, other, right_a, right_b = totals
        lines.append(f"| all | {n} | ({fp32:.1f}) | ({other:.1f}) | ({fp32 / other:.2f}x) | {same}/{n} = {same / n:.3f} "
                     f"| {agree}/{n} = {agree / n:.3f} | {right_a / n:.3f} / {right_b / n:.3f} |")
    return lines


def distill_lines(stages: dict, skill: str) -> list[str]:
    import numpy as np

    from skill_fleet_report import bootstrap, masks

    rows = {dtype: masks(stages, skill, f"distill-{dtype}") for dtype in DTYPES}
    lines = ["| generation dtype | seeds | accuracy per seed | mean [95% bootstrap, seeds x problems] | teacher step s "
             "(reused: the store held the entry) | LFT step s (held-out answers before/after + training) "
             "| agreement before -> after |",
             "|---|---|---|---|---|---|---|"]
    for dtype, m in rows.items():
        if not m:
            continue
        lo, hi = bootstrap(m)
        train = [stages[f"{skill}/train/distill-{dtype}/s{s}"] for s in sorted(m)]
        teacher_s = [t["steps"]["teacher"]["seconds"] if t["steps"]["teacher"]["cache"] == "computed" else None
                     for t in train]
        lft_s = [t["steps"]["lft"]["seconds"] for t in train]
        agree = [f"{t['light_finetune']['teacher_agreement_before']:.2f}->"
                 f"{t['light_finetune']['teacher_agreement_after']:.2f}" for t in train]
        lines.append(f"| {dtype} | {len(m)} | {', '.join(f'{m[s].mean():.2f}' for s in sorted(m))} | "
                     f"{np.mean([m[s].mean() for s in m]):.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{', '.join('reused' if x is None else f'{x:.0f}' for x in teacher_s)} | "
                     f"{', '.join(f'{x:.0f}' for x in lft_s)} | "
                     f"{', '.join(agree)} |")
    a, b = rows["bfloat16"], rows["float32"]
    if a and b and sorted(a) == sorted(b):
        lo, hi = bootstrap(a, b)
        x, y = np.concatenate([a[s] for s in sorted(a)]), np.concatenate([b[s] for s in sorted(a)])
        cells = (int(((x == i) & (y == j)).sum()) for i, j in ((1, 1), (1, 0), (0, 1), (0, 0)))
        _, nlo, nhi = paired_interval(*cells)
        diff = float(np.mean([a[s].mean() - b[s].mean() for s in a]))
        lines += ["", f"bf16 - float32: **{diff:+.3f}**, 95% bootstrap (seeds paired, problems paired) "
                      f"[{lo:+.3f}, {hi:+.3f}]; pooled paired Newcombe over {len(x)} (seed, problem) pairs "
                      f"[{nlo:+.3f}, {nhi:+.3f}]."]
    return lines


def write_markdown(pairs: list[str]) -> str:
    out = ["# Greedy generation in bf16 against float32 (issue 23, item 1)", "",
           "Written by `benchmarks/generation_dtype.py` (its docstring has the stages) from "
           "`benchmarks/results/generation_dtype_<pair>.json`.", ""]
    for pair in pairs:
        path = results_path(pair)
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        stages, skill, m = data["stages"], data["skill"], data["stages"]["machine"]
        commands = data.get("commands", [data["command"]])
        out += [f"## Pair `{pair}`, skill `{skill}`", "", *(f"    {c}" for c in commands), "",
                f"- CPU: {m['cpu']} ({m['cpus']} CPUs), torch threads {m['threads']}, 1024² GEMM "
                f"{m['gemm_1024_gflops']} GFLOP/s, bf16 matmul {m['bf16_matmul']}, torch {m['torch']}, "
                f"{m['date']}; load average at the start {m['loadavg']}.", "",
                "### The teacher's answers", "", *teacher_lines(stages), ""]
        if any(k.startswith("teacher/autocast/") for k in stages):
            out += ["### The teacher's answers under bf16 autocast (float32 weights; not a pipeline option yet)", "",
                    *teacher_lines(stages, "autocast"), ""]
        if any(k.startswith(f"{skill}/eval/distill-") for k in stages):
            out += ["### One benchmark row at both dtypes: transfer + distill-100", "", *distill_lines(stages, skill),
                    ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=("cross", "shape", "qwen"), default="cross")
    parser.add_argument("--skill", default="arithmetic")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "skill-fleet"),
                        help="the skill-fleet run's work directory (its old adapters and store)")
    parser.add_argument("--seeds", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--no-distill", action="store_true", help="the teacher stages only")
    parser.add_argument("--autocast", action="store_true", help="also the teacher under bf16 autocast (float32 "
                        "weights), a variant the pipeline does not offer yet")
    parser.add_argument("--markdown", action="store_true", help="write benchmarks/GENERATION_DTYPE.md and stop")
    args = parser.parse_args()
    if args.markdown:
        text = write_markdown(["cross", "shape", "qwen"])
        (ROOT / "benchmarks" / "GENERATION_DTYPE.md").write_text(text + "\n")
        print(text)
        return
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    args.command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/generation_dtype.py "
                    + shlex.join(sys.argv[1:]))
    run_args = Namespace(pair=args.pair, results=str(results_path(args.pair)), old_model=None, new_model=None,
                         workdir=args.workdir, threads=args.threads, skill=args.skill, seeds=args.seeds,
                         no_distill=args.no_distill, autocast=args.autocast, command=args.command)
    DtypeRun(run_args).run()


if __name__ == "__main__":
    main()
