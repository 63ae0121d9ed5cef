"""bf16 autocast against fp32 for LoRA training on a real model: step time and accuracy parity.

What it measures (Qwen2.5-Coder-0.5B-Instruct, rank-16 LoRA on q, k, v, o, gate, up, down, the built-in
arithmetic: ``builtin`` train samples, seed ``s``; test problems: the builtin test split, seed 1):

* ``steps``: the time of one optimizer step (batch 8, the first batch of the training data) in fp32 and under bf16
  autocast, *alternating* fp32 / bf16 / fp32 / ... in one process after one warm-up step each, so both modes see
  the same machine load; the median of ``--steps`` steps each, and their ratio.
* ``train_<mode>_seed<s>``: a fresh LoRA trained on 100 samples (lr 3e-4, batch 8, 2 epochs, warmup 5%) with
  ``autocast`` ``off`` (fp32) or ``bf16``; wall and CPU seconds, peak RSS, final loss.
* ``eval_<mode>_seed<s>``: its accuracy on the test problems (greedy, 40 new tokens, the evaluation dtype of the
  machine for both modes: the comparison is of the training dtype only), with the per-problem results, so the
  bf16 - fp32 difference per seed gets Newcombe's paired interval.

Every stage runs in a fresh child process and is written to ``benchmarks/results/bf16_training.json`` as soon as it
finishes; a rerun resumes. ``--markdown`` renders ``benchmarks/BF16_TRAINING.md``.

Usage
  .venv/bin/python benchmarks/bf16_training.py [--seeds 0,1] [--test-problems 200] [--steps 5]
  .venv/bin/python benchmarks/bf16_training.py --markdown
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from _common import loadavg, merge_json
from migration_benchmark import TARGETS, _threads, _train_dict, diff_ci, run_child, stage_eval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bf16_training.json"
MARKDOWN = ROOT / "benchmarks" / "BF16_TRAINING.md"
MODEL = "qwen2.5-coder-0.5b-instruct"
MODES = ("off", "bf16")
N_TRAIN = 100
EPOCHS = 2
TEST_SEED = 1


def _config(mode: str, seed: int):
    from lorasuite_core.training.config import TrainConfig

    return TrainConfig(lr=3e-4, epochs=EPOCHS, batch_size=8, seed=seed, warmup_ratio=0.05, autocast=mode,
                       show_progress=False)


def stage_steps(model_dir: str, n_steps: int) -> dict:
    """Median seconds of one optimizer step per mode, alternating modes step by step."""
    _threads()
    import torch

    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.devices import autocast_dtype
    from lorasuite_core.training.train import _train_step, build_examples, prepare_fresh_lora

    model, tokenizer = prepare_fresh_lora(model_dir, rank=16, alpha=32, targets=TARGETS, seed=0, device="cpu")
    examples = build_examples(tokenizer, generate_problems(8, "train", 0), 256)
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cpu")
    mixed = {mode: autocast_dtype(mode, device, params[0].dtype) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in range(n_steps + 1):
        for mode in MODES:
            start = time.perf_counter()
            _train_step(model, [list(range(8))], examples, tokenizer.pad_token_id, device, None, mixed[mode])
            model.zero_grad(set_to_none=True)
            if step:   # step 0 warms up both modes
                times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return {"step_seconds": {m: round(v, 3) for m, v in medians.items()},
            "all_step_seconds": {m: [round(x, 3) for x in t] for m, t in times.items()},
            "speedup": round(medians["off"] / medians["bf16"], 2), "batch": 8,
            "compute_dtype": {m: str(mixed[m] or params[0].dtype).replace("torch.", "") for m in MODES}}


def stage_train(model_dir: str, out_dir: str, mode: str, seed: int) -> dict:
    _threads()
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.train import train_lora

    result = train_lora(model_dir, generate_problems(N_TRAIN, "train", seed), out_dir, rank=16, alpha=32,
                        targets=TARGETS, config=_config(mode, seed))
    return _train_dict(result)


def machine() -> dict:
    """The CPU (lscpu's model name and flags that matter) and a 2048² GEMM rate in fp32 and bf16."""
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates[str(dtype).replace("torch.", "")] = round(5 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9, 1)
    from lorasuite_core.training.devices import cpu_supports_bf16

    return {"cpu": name, "cores": torch.get_num_threads(), "bf16_matmul": cpu_supports_bf16(),
            "gemm_gflops": rates, "torch": torch.__version__, "python": platform.python_version(),
            "loadavg": loadavg()}


def run(args) -> None:
    from lorasuite_core.models.model_fetch import fetch_model

    model_dir = str(fetch_model(MODEL))
    work = Path(args.workdir)
    done = json.loads(RESULTS.read_text()).get("stages", {}) if RESULTS.is_file() else {}

    def record(name: str, fn, *fn_args) -> dict:
        if name in done:
            return done[name]
        print(f"[bf16] {name} ...", flush=True)
        result = run_child(fn, *fn_args)
        done[name] = result
        merge_json(RESULTS, {"stages": done})
        print(f"[bf16] {name}: {json.dumps({k: v for k, v in result.items() if k != 'correct_mask'})[:300]}", flush=True)
        return result

    merge_json(RESULTS, {"command": "python benchmarks/bf16_training.py " + " ".join(args.argv),
                         "machine": run_child(machine), "model": MODEL, "n_train": N_TRAIN, "epochs": EPOCHS,
                         "test_problems": args.test_problems, "test_seed": TEST_SEED, "seeds": args.seeds})
    record("steps", stage_steps, model_dir, args.steps)
    for seed in args.seeds:
        for mode in MODES:
            out = str(work / f"{mode}-seed{seed}")
            record(f"train_{mode}_seed{seed}", stage_train, model_dir, out, mode, seed)
            record(f"eval_{mode}_seed{seed}", stage_eval, model_dir, out, args.test_problems, TEST_SEED, 16)


def markdown() -> str:
    data = json.loads(RESULTS.read_text())
    stages, m = data["stages"], data["machine"]
    lines = ["# bf16 autocast vs fp32 for LoRA training", "",
             f"Command: `{data['command']}`. Machine: {m['cpu']}, {m['cores']} cores, bf16 matmul "
             f"{m['bf16_matmul']}, GEMM 2048² {m['gemm_gflops']} GFLOP/s (parent process), torch {m['torch']}, load "
             f"average at the start {m['loadavg']}. Model {data['model']}, fresh rank-16 LoRA on {data['n_train']} "
             f"built-in arithmetic samples, {data['epochs']} epochs; {data['test_problems']} test problems (seed "
             f"{data['test_seed']}), evaluated in the machine's evaluation dtype for both rows.", ""]
    if data.get("notes"):
        lines += [f"Conditions: {data['notes']}", ""]
    if "steps" in stages:
        s = stages["steps"]
        lines += [f"**Step time** (batch {s['batch']}, alternating modes in one process, median): fp32 "
                  f"{s['step_seconds']['off']} s, bf16 autocast {s['step_seconds']['bf16']} s: **{s['speedup']}x**.", ""]
    lines += ["| seed | mode | train wall s | train CPU s | final loss | accuracy [95% CI] | load average (1 min) start → end |",
              "|---|---|---|---|---|---|---|"]
    for seed in data["seeds"]:
        for mode in MODES:
            t, e = stages.get(f"train_{mode}_seed{seed}"), stages.get(f"eval_{mode}_seed{seed}")
            if t and e:
                lines.append(f"| {seed} | {'fp32' if mode == 'off' else 'bf16 autocast'} | {t['seconds']:.0f} | "
                             f"{t['cpu_seconds']:.0f} | {t['final_loss']:.3f} | {e['accuracy']:.3f} "
                             f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}] | {t['loadavg_start'][0]} → "
                             f"{t['loadavg_end'][0]} |")
    lines.append("")
    for seed in data["seeds"]:
        a, b = stages.get(f"eval_bf16_seed{seed}"), stages.get(f"eval_off_seed{seed}")
        if a and b:
            d, low, high = diff_ci(a, b)
            lines.append(f"- seed {seed}: bf16 − fp32 = {d:+.3f}, paired 95% interval [{low:+.3f}, {high:+.3f}] "
                         f"({'inside' if low <= 0 <= high else 'outside'} the noise of the test problems)")
    lines += ["", "Intervals cover the sampling of test problems; the seeds show run-to-run variation."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--test-problems", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bf16-training"))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.markdown:
        MARKDOWN.write_text(markdown())
        print(MARKDOWN.read_text())
        return
    run(args)


if __name__ == "__main__":
    main()
