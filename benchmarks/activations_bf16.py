"""The activations stage in bf16 autocast against float32, on the real Qwen pair: time and the CKA layer mapping.

Issue 23 item 4 ("bf16 activations for CKA"): the calibration forward passes of both models
(``transfer.activations.paired_activations``, the built-in calibration text, 2048 paired tokens) run
in float32 and under bf16 autocast, *alternating* float32 / bf16 / float32 / bf16 in one process so
both see the same machine load; then the CKA of the layer updates (``transfer.cka``) and the monotone
layer mapping (``transfer.layer_mapping.map_layers``) from each, compared: the largest CKA difference
and whether the mappings are equal.  The pipeline uses bf16 here only where the states feed nothing
but CKA (``pipeline.plans.activations_dtype``).

    LORASUITE_BENCH_THREADS=1 .venv/bin/python benchmarks/activations_bf16.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import cpu_model, gemm_gflops, merge_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "activations_bf16.json"
MODELS = Path(os.environ.get("LORASUITE_MODELS_DIR", Path.home() / ".cache" / "lorasuite" / "models"))
OLD = MODELS / "qwen2.5-coder-0.5b-instruct" / "hf"
NEW = MODELS / "qwen2.5-coder-1.5b-instruct" / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LORASUITE_BENCH_THREADS", "1")))

    from lorasuite_core.models.loading import load_base_model
    from lorasuite_core.transfer.activations import PairedActivations, builtin_calibration_texts, paired_activations
    from lorasuite_core.transfer.cka import minibatch_cka
    from lorasuite_core.transfer.layer_mapping import map_layers

    old, new = load_base_model(str(OLD)), load_base_model(str(NEW))
    texts = builtin_calibration_texts()
    gemm = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    cpu: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    states = {}
    load_start = os.getloadavg()
    for _ in range(args.repeats):
        for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
            start, c = time.perf_counter(), time.process_time()
            states[name] = paired_activations(old, new, texts, max_tokens=args.max_tokens, progress=False,
                                              compute_dtype=dtype)
            seconds[name].append(round(time.perf_counter() - start, 2))
            cpu[name].append(round(time.process_time() - c, 2))
            print(name, seconds[name][-1], "s", flush=True)
    ckas = {name: minibatch_cka(PairedActivations.updates(s.old_states), PairedActivations.updates(s.new_states))
            for name, s in states.items()}
    mappings = {name: [list(p) for p in map_layers(c, None)] for name, c in ckas.items()}
    relative = float(np.abs(states["bfloat16"].new_states - states["float32"].new_states).max()
                     / np.abs(states["float32"].new_states).max())
    merge_json(RESULTS, {
        "command": f"LORASUITE_BENCH_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/activations_bf16.py "
                   f"--repeats {args.repeats} --max-tokens {args.max_tokens}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gemm_2048_gflops": gemm, "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "torch": torch.__version__},
        "paired_tokens": states["float32"].num_tokens,
        "seconds": seconds, "cpu_seconds": cpu,
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "speedup_median": round(statistics.median(seconds["float32"]) / statistics.median(seconds["bfloat16"]), 2),
        "max_state_difference_relative": round(relative, 5),
        "cka_max_abs_difference": round(float(np.abs(ckas["bfloat16"] - ckas["float32"]).max()), 5),
        "layer_mapping": mappings, "same_layer_mapping": mappings["bfloat16"] == mappings["float32"]})


if __name__ == "__main__":
    main()
