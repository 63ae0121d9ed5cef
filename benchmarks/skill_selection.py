"""Skill selection: how the bare models (and, with ``--lora``, a fresh LoRA on N labelled samples) do on
each registered skill's test split, to check the skills the benchmark uses are neither solved by the bare
models nor saturated by 100 labelled samples.

Rows (per model and skill): ``bare`` -- the base model alone; ``lora-N`` (``--lora N``) -- a fresh LoRA
(rank 16 on q, k, v, o, gate, up, down; alpha 32; lr ``--lora-lr``; 1 epoch; the training seed) trained on
``task:SKILL:train:N`` and evaluated the same way.  Every row is lorasuite's own evaluation
(``lorasuite_core.training.evaluation.evaluate``: greedy, the skill's stop rule, budget and scorer) on
``task:SKILL:test:T`` (seed ``--seed``), with its 95% Wilson interval, wall seconds and every
generation (its first 300 characters).

Resumable: every finished row is merged into the JSON at once (``_common.merge_json``) and skipped on a
rerun; the Markdown is rewritten from the JSON.  Run as::

    nice -n 19 .venv/bin/python benchmarks/skill_selection.py --models qwen2.5-coder-0.5b-instruct

Models are fetched with ``lorasuite models fetch`` (a name) or given as a local directory.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import loadavg, merge_json  # noqa: E402

from lorasuite_core.training import skills  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "skill_selection.json"
MARKDOWN = ROOT / "benchmarks" / "SKILL_SELECTION.md"
FINDINGS = "## Findings"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def model_dir(name: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    from lorasuite_core.models.model_fetch import fetch_model

    return Path(fetch_model(name))


def label(name: str) -> str:
    """A model's row label: its known name, or its directory's name (the parent's for a fetched ``.../hf``)."""
    path = Path(name)
    if not path.is_dir():
        return name
    return path.resolve().parent.name if path.name == "hf" else path.name


def run_row(model: Path, name: str, skill: str, args, lora: int | None) -> dict:
    import torch

    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.train import TrainConfig, train_lora

    test = skills.load_task_samples(f"task:{skill}:test:{args.test_samples}", None, args.seed, args.test_samples)
    entry: dict = {"model": name, "skill": skill, "row": "bare" if lora is None else f"lora-{lora}",
                   "test": f"task:{skill}:test:{args.test_samples}", "seed": args.seed,
                   "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg()}
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="skill-selection-") as tmp:
        adapter = None
        if lora is not None:
            train = skills.load_task_samples(f"task:{skill}:train:{lora}", None, args.train_seed, lora)
            config = TrainConfig(lr=args.lora_lr, epochs=1, seed=args.train_seed, show_progress=False)
            adapter = (args.keep_adapters / f"{label(name)}-{skill}-lora{lora}" if args.keep_adapters
                       else Path(tmp) / "adapter")
            fit = train_lora(model, train, adapter, rank=16, alpha=32, config=config)
            entry["train"] = {"data": f"task:{skill}:train:{lora}", "lr": args.lora_lr, "epochs": 1,
                              "seed": args.train_seed, "seconds": round(fit.seconds, 1), "steps": fit.steps,
                              "final_loss": fit.final_loss}
        result = evaluate(model, test, adapter_dir=adapter, batch_size=args.batch_size, dtype=args.dtype,
                          show_progress=False)
    entry.update({k: result.to_dict()[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct", "dtype")})
    entry["eval_seconds"] = round(result.seconds, 1)
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    entry["cpu_s"] = round(time.process_time() - cpu_start, 1)
    entry["loadavg_end"] = loadavg()
    entry["predictions"] = [{"gold": p.gold, "predicted": p.predicted, "correct": p.correct,
                             "generation": p.generation[:300]} for p in result.predictions]
    return entry


def write_markdown(data: dict, path: Path, source: Path = RESULTS) -> None:
    meta = data.get("_conditions", {})
    rows = [v for k, v in sorted(data.items()) if not k.startswith("_")]
    lines = ["# Skill selection: bare models (and fresh LoRAs) on each skill's test split", "",
             f"Generated by `benchmarks/skill_selection.py` from `benchmarks/results/{source.name}`.", "",
             f"- command: `{meta.get('command', '?')}`",
             f"- CPU: {meta.get('cpu', '?')} ({meta.get('cores', '?')} cores, shared with other jobs: see the load "
             "averages in the JSON), evaluation dtype as listed, greedy decoding, lorasuite's `evaluate`",
             "- accuracy with its 95% Wilson interval over the test samples; seconds are wall time of the row", "",
             "| model | skill | row | accuracy | 95% interval | n | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['skill']} | {r['row']} | {r['accuracy']:.3f} | "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['n']} | {r['wall_s']} |")
    kept = ""   # a hand-written findings section survives regeneration
    if path.is_file() and FINDINGS in path.read_text():
        kept = "\n" + FINDINGS + path.read_text().split(FINDINGS, 1)[1]
    path.write_text("\n".join(lines) + "\n" + kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--skills", nargs="+", default=sorted(skills.SKILLS), choices=sorted(skills.SKILLS))
    parser.add_argument("--test-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the test samples")
    parser.add_argument("--lora", type=int, nargs="*", default=[], help="also fresh LoRAs on N train samples")
    parser.add_argument("--lora-lr", type=float, default=3e-4)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--keep-adapters", type=Path, help="keep each fresh LoRA in DIR/MODEL-SKILL-loraN")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN)
    args = parser.parse_args(argv)
    command = "nice -n 19 .venv/bin/python benchmarks/skill_selection.py " + shlex.join(argv or sys.argv[1:])
    merge_json(args.output, {"_conditions": {"command": command, "cpu": cpu_model(), "cores": os.cpu_count(),
                                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}})
    for name in args.models:
        model = model_dir(name)
        for lora in [None, *args.lora]:
            for skill in args.skills:
                key = f"{label(name)}/{skill}/{'bare' if lora is None else f'lora-{lora}'}"
                data = merge_json(args.output, {})
                if key in data:
                    continue
                print(f"[skill-selection] {key} ...", flush=True)
                entry = run_row(model, label(name), skill, args, lora)
                print(f"[skill-selection] {key}: {entry['accuracy']:.3f} ({entry['correct']}/{entry['n']}) "
                      f"in {entry['wall_s']} s", flush=True)
                write_markdown(merge_json(args.output, {key: entry}), args.markdown, args.output)
    write_markdown(merge_json(args.output, {}), args.markdown, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
