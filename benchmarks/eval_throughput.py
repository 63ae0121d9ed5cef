"""Evaluation throughput: the old greedy evaluation (fp32, HF ``generate``) vs the new one (bf16 + own loop).

Both variants generate for the *same* built-in test problems on the same model and are scored by
the same function (``evaluation.score_generation``), so accuracies, generations and predicted
numbers compare row by row.

* ``old``: ``lorasuite_core/training/evaluation.py`` as of ``--old-commit`` (read with
  ``git show`` into a temporary directory and imported from there): fp32, ``model.generate``
  with the per-sequence stopping criterion, batches of 16 sorted by character length.
* ``new``: the current module: ``dtype="auto"`` (bf16 on this CPU), ``greedy_generate``
  with ``--batch-size`` (default 64, ``evaluate``'s default).
* ``new-fp32``: the new loop in float32 (separates the loop's gain from bf16's).

Timing is generation only (the model load is timed separately), per chunk of problems; the
JSON is written after every chunk, and a rerun with the same arguments skips chunks already in
it (resumable). The load average is sampled every 5 s while a chunk runs (the machine is
shared: other processes' load inflates the times). Work is counted as 2 FLOP per parameter
per token through the decoder (prompt positions incl. padding, and every row of every decode
step), plus the vocabulary projection for each generated token; attention is ignored (<2% here).

    .venv/bin/python benchmarks/eval_throughput.py --n 48 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorasuite_core.training import evaluation  # noqa: E402
from lorasuite_core.training.task_data import format_prompt, generate_problems  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache/lorasuite/models/qwen2.5-coder-1.5b-instruct/hf"
OLD_COMMIT = "9b15007"  # last commit of evaluation.py before the own greedy loop


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds in a daemon thread."""

    def __init__(self, period: float = 5.0):
        self.period, self.samples, self._stop = period, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"min": min(self.samples), "mean": sum(self.samples) / len(self.samples), "max": max(self.samples),
                "samples": len(self.samples)}


def import_old_module(commit: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:lorasuite_core/training/evaluation.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="old-eval-")) / "old_evaluation.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_evaluation"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def param_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = embed.data_ptr() == head.data_ptr()
    return {"total": total, "decoder": total - embed.numel() - (0 if tied else head.numel()), "lm_head": head.numel(),
            "tied_embeddings": tied}


class Variant:
    """One way to generate: ``load()`` then ``generate(prompts) -> (texts, counters)``."""

    def __init__(self, name: str, args, old_module=None):
        self.name, self.args, self.old = name, args, old_module
        self.model = self.tokenizer = None

    def load(self) -> float:
        start = time.perf_counter()
        if self.name == "old":
            self.model, self.tokenizer = self.old._load_for_eval(self.args.model, None, "float32", "cpu")
        else:  # "new": dtype auto (bf16 here); "new-fp32": the same loop in float32
            dtype = "float32" if self.name == "new-fp32" else "auto"
            self.model, self.tokenizer = evaluation._load_for_eval(self.args.model, None, dtype, "cpu")
        return time.perf_counter() - start

    @property
    def batch_size(self) -> int:
        return 16 if self.name == "old" else self.args.batch_size

    def generate(self, prompts: list[str]) -> tuple[list[str], dict]:
        if self.name != "old":
            stats = evaluation.GenerationStats()
            texts = evaluation.greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                                               batch_size=self.batch_size, stop=evaluation.generation_finished,
                                               stats=stats)
            return texts, {"padded_prompt_tokens": stats.padded_prompt_tokens, "row_steps": stats.row_steps,
                           "generated_tokens": stats.generated_tokens, "prefill_seconds": stats.prefill_seconds}
        # old evaluate(): sort by character length, batches of 16, HF generate with the stopping criterion
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts, counters = [""] * len(prompts), {"padded_prompt_tokens": 0, "row_steps": 0, "generated_tokens": 0}
        for begin in range(0, len(order), self.batch_size):
            indices = order[begin:begin + self.batch_size]
            batch = [prompts[i] for i in indices]
            width = self.tokenizer(batch, return_tensors="pt", padding=True)["input_ids"].shape
            out = self.old.generate_batch(self.model, self.tokenizer, batch, self.args.max_new_tokens)
            steps = max(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out)
            counters["padded_prompt_tokens"] += width[0] * width[1]
            counters["row_steps"] += width[0] * max(steps - 1, 0)  # HF generate keeps finished rows to the end
            counters["generated_tokens"] += width[0] * steps
            for i, text in zip(indices, out, strict=True):
                texts[i] = text
        return texts, counters


def gflop(counters: dict, params: dict) -> float:
    decoder = 2 * params["decoder"] * (counters["padded_prompt_tokens"] + counters["row_steps"])
    head = 2 * params["lm_head"] * counters["generated_tokens"]
    return (decoder + head) / 1e9


def summarise(run: dict, n_total: int, params: dict) -> dict:
    preds = [p for c in run["chunks"] for p in c["predictions"]]
    seconds = sum(c["seconds"] for c in run["chunks"])
    counters = {k: sum(c["counters"][k] for c in run["chunks"]) for k in ("padded_prompt_tokens", "row_steps",
                                                                         "generated_tokens")}
    correct, n = sum(p["correct"] for p in preds), len(preds)
    low, high = evaluation.wilson_interval(correct, n)
    work = gflop(counters, params)
    loads = [c["load"]["mean"] for c in run["chunks"]]
    return {"n": n, "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
            "generation_seconds": seconds, "seconds_per_problem": seconds / n,
            "tokens_per_second": counters["generated_tokens"] / seconds, **counters, "work_gflop": work,
            "gflop_per_second": work / seconds, "extrapolated_200_problems_minutes": 200 * seconds / n / 60,
            "load_mean_over_chunks": sum(loads) / len(loads), "complete": n == n_total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16, help="problems per timed chunk of the old variant")
    parser.add_argument("--variants", default="old,new")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_throughput.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {k: getattr(args, k) for k in ("model", "n", "seed", "threads", "batch_size", "max_new_tokens",
                                            "chunk", "old_commit")}
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    if data.get("config") != config:
        data = {"config": config, "runs": {}}
    data["conditions"] = {
        "command": "python benchmarks/eval_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "cpu_bf16": evaluation.cpu_supports_bf16(),
        "new_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "note": "shared machine: load average sampled every 5 s during each chunk (this process adds ~threads)"}
    samples = generate_problems(args.n, "test", seed=args.seed)
    prompts = [format_prompt(s) for s in samples]
    old_module = import_old_module(args.old_commit) if "old" in args.variants.split(",") else None
    for name in args.variants.split(","):
        run = data["runs"].setdefault(name, {"chunks": []})
        done = {i for c in run["chunks"] for i in c["indices"]}
        chunk = args.chunk if name == "old" else max(args.batch_size, 1)
        todo = [list(range(b, min(b + chunk, args.n))) for b in range(0, args.n, chunk)]
        todo = [c for c in todo if not set(c) <= done]
        if not todo:
            continue
        variant = Variant(name, args, old_module)
        run["load_seconds"] = variant.load()
        run["dtype"] = str(next(variant.model.parameters()).dtype).replace("torch.", "")
        run["batch_size"] = variant.batch_size
        run["command"] = data["conditions"]["command"]
        run["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
        params = run["params"] = param_counts(variant.model)
        for indices in todo:
            with LoadSampler() as load:
                start, cpu_start = time.perf_counter(), time.process_time()
                texts, counters = variant.generate([prompts[i] for i in indices])
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            predictions = [evaluation.score_generation(i, t, samples[i].answer) for i, t in zip(indices, texts)]
            run["chunks"].append({"indices": indices, "seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "cores_obtained": cpu_seconds / seconds, "load": load.summary(), "counters": counters,
                                  "gflop_per_second": gflop(counters, params) / seconds,
                                  "predictions": [vars(p) for p in predictions]})
            run["summary"] = summarise(run, args.n, params)
            out.write_text(json.dumps(data, indent=1) + "\n")
            print(f"{name}: {len(indices)} problems in {seconds:.1f}s, load {load.summary()['mean']:.1f}", flush=True)
        del variant
    if "old" in data["runs"]:
        data.pop("agreement", None), data.pop("speedup_seconds_per_problem", None)  # recomputed below
        old_p = {p["index"]: p for c in data["runs"]["old"]["chunks"] for p in c["predictions"]}
        for name in [k for k in data["runs"] if k != "old"]:
            new_p = {p["index"]: p for c in data["runs"][name]["chunks"] for p in c["predictions"]}
            common = sorted(old_p.keys() & new_p.keys())
            data.setdefault("agreement_with_old", {})[name] = {
                "n": len(common),
                "identical_generations": sum(old_p[i]["generation"] == new_p[i]["generation"] for i in common),
                "identical_predicted_numbers": sum(old_p[i]["predicted"] == new_p[i]["predicted"] for i in common),
                "identical_correctness": sum(old_p[i]["correct"] == new_p[i]["correct"] for i in common)}
            o, w = data["runs"]["old"].get("summary"), data["runs"][name].get("summary")
            if o and w:
                data.setdefault("speedup_seconds_per_problem", {})[name] = (o["seconds_per_problem"]
                                                                            / w["seconds_per_problem"])
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v.get("summary") for k, v in data["runs"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
