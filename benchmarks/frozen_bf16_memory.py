"""Peak memory of bf16-autocast LoRA training with the frozen linear weights held in bf16, and without.

``lorasuite_core.training.frozen_bf16`` holds a checkpoint's frozen linear weights in bf16 during the training loop
when that is lossless (a bf16 release loaded in float32).  This measures what it saves and checks it changes nothing:

* checkpoints: ``bf16`` -- the fetched model saved again in bf16 (a release as published: every weight a bf16
  value; made once under ``--workdir``); ``fetched`` -- the model as ``lorasuite models fetch`` writes it (float32,
  dequantised from GGUF: no weight is lossless, so nothing is held and both modes must agree to the byte);
* ``bf16-distill`` (``--distill``): ``distill_finetune`` on the bf16 copy, its teacher the bf16 copy + the adapter of
  the ``bf16/plain`` run, the student the same adapter trainable, the teacher's greedy answers (32 new tokens) as
  targets, the token-level KL on (identity map): the teacher runs inside the loop and is held too;
* modes: ``held`` (the code as it is) and ``plain`` (``bf16_frozen_linears`` replaced by a no-op);
* each run: a fresh child process under ``/usr/bin/time -v``: ``train_lora`` on ``--steps`` x 4 samples of
  ``task:family_relationships:train`` (rank 16, alpha 32, the seven projections, batch 4, lr 3e-4, autocast bf16,
  seed 0); its peak RSS (the whole process, and split at the start of the training loop by resetting the kernel's
  high-water mark, ``/proc/self/clear_refs``: loading the model, and the loop itself, after the memory loading
  freed is given back, ``lorasuite_core.io.memory.release_freed_memory``, in both modes), wall and CPU seconds,
  every step's loss and the SHA-256 of the adapter file.

Results: ``benchmarks/results/frozen_bf16_memory.json`` (merged per run; a rerun skips what is there);
``--markdown`` renders ``benchmarks/FROZEN_BF16_MEMORY.md``.

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/frozen_bf16_memory.py --models qwen2.5-coder-0.5b-instruct
  .venv/bin/python benchmarks/frozen_bf16_memory.py --markdown
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import cpu_model, gemm_gflops, loadavg, merge_json, parse_time_v  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "frozen_bf16_memory.json"
MARKDOWN = ROOT / "benchmarks" / "FROZEN_BF16_MEMORY.md"
MODES = ("plain", "held")


def distill_run(model_dir: str, adapter: str, samples, out_dir: str, config):
    """distill_finetune: teacher = the model + ``adapter``, student = the model + the same adapter (trainable),
    the teacher's greedy answers (32 new tokens) as targets, KL on (identity map)."""
    from lorasuite_core.training import distill as D
    from lorasuite_core.training import prompts as P

    teacher, tokenizer = D.load_for_generation(model_dir, adapter, dtype="float32", device="cpu")
    prompts = P.prompts_from_samples(samples)
    targets = D.greedy_completions(teacher, tokenizer, prompts, max_new_tokens=32, batch_size=4)
    run = D.distill_finetune(model_dir, adapter, prompts, targets, out_dir, config=config, teacher=teacher,
                             teacher_tokenizer=tokenizer, token_map=D.TokenMap.between(tokenizer, tokenizer))
    return run.training


def child(mode: str, model_dir: str, steps: int, out_dir: str, teacher_adapter: str = "") -> None:
    """One training run in this process (a distillation with ``teacher_adapter``); prints one JSON line."""
    import contextlib

    import torch

    torch.set_num_threads(int(os.environ.get("LORASUITE_BENCH_THREADS", "1")))
    from lorasuite_core.training import frozen_bf16
    from lorasuite_core.training import train as T
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.samples import load_samples

    held = []
    real = frozen_bf16.bf16_frozen_linears

    @contextlib.contextmanager
    def counted(model, mixed):
        with (real(model, mixed) if mode == "held" else contextlib.nullcontext(frozen_bf16.Bf16Weights([]))) as h:
            held.append(sum(t.numel() for t in h.tensors))      # the student's, then (distillation) the teacher's
            yield h

    from lorasuite_core.io.memory import release_freed_memory

    def vm_hwm_mb(field: str = "VmHWM") -> float:
        return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(field))

    def vm_rss_mb() -> float:
        return vm_hwm_mb("VmRSS")

    phases = {}
    optimise = T._optimise

    def phased(*args, **kwargs):
        phases["load_peak_gb"] = round(vm_hwm_mb() * 2**20 / 1e9, 2)     # loading the model, before the loop
        release_freed_memory()                        # what loading freed, so the loop is charged for its own only
        phases["loop_start_gb"] = round(vm_rss_mb() * 2**20 / 1e9, 2)
        Path("/proc/self/clear_refs").write_text("5")                      # reset the high-water mark
        try:
            return optimise(*args, **kwargs)
        finally:
            phases["loop_peak_gb"] = round(vm_hwm_mb() * 2**20 / 1e9, 2)

    T.bf16_frozen_linears, T._optimise = counted, phased
    samples = load_samples(f"task:family_relationships:train:{4 * steps}", None, seed=0)
    config = TrainConfig(epochs=1, batch_size=4, lr=3e-4, seed=0, show_progress=False, autocast="bf16")
    if teacher_adapter:
        result = distill_run(model_dir, teacher_adapter, samples, out_dir, config)
    else:
        result = T.train_lora(model_dir, samples, out_dir, rank=16, alpha=32.0, config=config)
    digest = hashlib.sha256((Path(out_dir) / T.ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    print(json.dumps({"losses": result.losses, "steps": result.steps, "adapter_sha256": digest,
                      "held_parameters": sum(held), "compute_dtype": result.compute_dtype, **phases}))


def bf16_copy(model_dir: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, use_safetensors=True)
    model.save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(target))
    return target


def run(args) -> None:
    from lorasuite_core.models.model_fetch import fetch_model

    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    threads = os.environ.get("LORASUITE_BENCH_THREADS", "1")
    if "machine" not in data:
        import torch

        torch.set_num_threads(int(threads))
        merge_json(RESULTS, {"machine": {"cpu": cpu_model(), "threads": int(threads),
                                         "gemm_gflops_1024": {"float32": round(gemm_gflops(torch.float32, 1024), 1),
                                                              "bfloat16": round(gemm_gflops(torch.bfloat16, 1024), 1)},
                                         "torch": torch.__version__},
                             "commands": []})
    command = (f"LORASUITE_BENCH_THREADS={threads} nice -n 19 .venv/bin/python benchmarks/frozen_bf16_memory.py "
               + " ".join(sys.argv[1:]))
    data = json.loads(RESULTS.read_text())
    merge_json(RESULTS, {"commands": list(dict.fromkeys([*data.get("commands", []), command]))})
    runs = dict(data.get("runs", {}))
    work = Path(args.workdir)
    for name in args.models:
        fetched = Path(fetch_model(name))
        kinds = [("bf16", lambda: bf16_copy(fetched, work / f"{name}-bf16")), ("fetched", lambda: fetched)]
        if args.distill:
            kinds.append(("bf16-distill", lambda: bf16_copy(fetched, work / f"{name}-bf16")))
        for kind, directory in kinds:
            for mode in MODES:
                key = f"{name}/{kind}/{mode}"
                teacher = str(work / "out" / f"{name}/bf16/plain") if kind == "bf16-distill" else ""
                if key in runs:
                    continue
                print(f"[frozen-bf16] {key} ...", flush=True)
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads)
                load = loadavg()
                done = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--child", mode,
                                       str(directory()), str(args.steps), str(work / "out" / key), teacher],
                                      cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{key} failed:\n{done.stderr[-3000:]}")
                timing = parse_time_v(done.stderr)
                runs[key] = {**json.loads(done.stdout.strip().splitlines()[-1]), **timing,
                             "loadavg_start": load, "loadavg_end": loadavg()}
                merge_json(RESULTS, {"runs": runs})
                print(f"[frozen-bf16] {key}: peak {timing['peak_rss_gb']} GB, {timing.get('wall_s')} s", flush=True)


def markdown() -> str:
    data = json.loads(RESULTS.read_text())
    m = data["machine"]
    lines = ["# Frozen linear weights held in bf16 during bf16-autocast training", "",
             f"Generated by `benchmarks/frozen_bf16_memory.py --markdown` from `{RESULTS.relative_to(ROOT)}`; the "
             "runs are defined in the script's docstring.", "",
             *[f"- command: `{c}`" for c in data.get("commands", [data.get("command")])],
             *([f"- {data['note']}"] if "note" in data else []),
             f"- CPU: {m['cpu']}, torch threads {m['threads']}, 1024² GEMM {m['gemm_gflops_1024']} GFLOP/s, "
             f"torch {m['torch']}; shared with other benchmarks (load averages in the JSON)", "",
             "| model | checkpoint | mode | held parameters | peak RSS GB | loading GB | loop start GB | training loop GB "
             "| wall s | CPU s "
             "| losses | adapter = plain's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = data["runs"]
    for key, r in sorted(runs.items(), key=lambda kv: (kv[0].split("/")[:2], MODES.index(kv[0].split("/")[2]))):
        model, kind, mode = key.split("/")
        plain = runs.get(f"{model}/{kind}/plain", {})
        same = "yes" if plain.get("adapter_sha256") == r["adapter_sha256"] else "NO"
        lines.append(f"| {model} | {kind} | {mode} | {r['held_parameters']:,} | {r['peak_rss_gb']:.2f} | "
                     f"{r['load_peak_gb']:.2f} | {r['loop_start_gb']:.2f} | {r['loop_peak_gb']:.2f} | "
                     f"{r['wall_s']:.1f} | {r['user_s'] + r['system_s']:.1f} | "
                     f"{', '.join(f'{x:.4f}' for x in r['losses'])} | {same} |")
    lines += ["", "Peak RSS: the whole process (`/usr/bin/time -v`). Loading: the high-water mark when the training loop "
              "starts (transformers reading the checkpoint into float32). Loop start: RSS after the memory loading freed "
              "is given back. Training loop: the high-water mark from there to the loop's end (the mark is reset at its "
              "start). Losses and adapter: the same to the bit in both modes of each checkpoint.", ""]
    text = "\n".join(lines) + "\n"
    MARKDOWN.write_text(text)
    return text


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:4], int(sys.argv[4]), *sys.argv[5:7])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--distill", action="store_true", help="also a distillation (kind bf16-distill): teacher "
                        "= the bf16 copy + the bf16/plain run's adapter, student = the same (trainable), KL on")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "frozen-bf16"))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
        return
    run(args)


if __name__ == "__main__":
    main()
