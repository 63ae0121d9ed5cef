"""Neuron matching at Qwen widths: the dense Hungarian against the sparse path, on the real pair.

Issue 23 item 4 asks for the sparse neuron assignment at Qwen widths *where it gives the same
matching as the dense Hungarian*.  This measures whether it does, on Qwen2.5-Coder-0.5B-Instruct
(4864 neurons, d 896) -> Qwen2.5-Coder-1.5B-Instruct (8960 neurons, d 1536), with the project's own
pieces: the shared vocabulary, the residual transfer (``transfer.residual``), the per-layer maps
(``transfer.adapter.layer_pair_maps``) and ``transfer.matching.match_neurons`` in the ranking dtype
(``RANKING_DTYPE``), once with ``dense_limit`` above n_o·n_n (dense similarity + Hungarian, what
the code does today at this width) and once with ``dense_limit = 0`` (sketch, candidates, sparse
full matching).  Per layer pair: both times, the share of old neurons given the same new neuron,
and both matchings' mean exact similarity (the dense one is the optimum, so sparse ≤ dense).

Layer pairs: ``--pairs`` old:new pairs (default: four spread over depth with j = round(i·(L_n−1)/(L_o−1)),
the proportional positions; the CKA mapping of a migration is close to these on this pair).

    LORASUITE_BENCH_THREADS=1 .venv/bin/python benchmarks/neuron_matching_qwen.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from _common import cpu_model, gemm_gflops, merge_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "neuron_matching_qwen.json"
MODELS = Path(os.environ.get("LORASUITE_MODELS_DIR", Path.home() / ".cache" / "lorasuite" / "models"))
OLD = MODELS / "qwen2.5-coder-0.5b-instruct" / "hf"
NEW = MODELS / "qwen2.5-coder-1.5b-instruct" / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="*", default=None, help="old:new layer pairs")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("LORASUITE_BENCH_THREADS", "1")))

    from lorasuite_core.models.loading import load_base_model
    from lorasuite_core.transfer.adapter import layer_pair_maps
    from lorasuite_core.transfer.layer_weights import layer_weights
    from lorasuite_core.transfer.matching import RANKING_DTYPE, match_neurons
    from lorasuite_core.transfer.residual import residual_transfer
    from lorasuite_core.transfer.vocab import shared_vocabulary

    old, new = load_base_model(str(OLD)), load_base_model(str(NEW))
    Lo, Ln = old.dims.num_layers, new.dims.num_layers
    if args.pairs:
        pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs]
    else:
        pairs = [(i, round(i * (Ln - 1) / (Lo - 1))) for i in (0, Lo // 3, 2 * Lo // 3, Lo - 1)]
    rt = residual_transfer(old, new, shared_vocabulary(old.tokenizer(), new.tokenizer()))
    rows = []
    for i, j in pairs:
        maps = layer_pair_maps(old, new, rt, i, j)
        ow, nw = layer_weights(old, i), layer_weights(new, j)
        result = {"old_layer": i, "new_layer": j}
        matched = {}
        for name, limit in (("dense", 10 ** 12), ("sparse", 0)):
            start, cpu = time.perf_counter(), time.process_time()
            pairs_, mean = match_neurons(ow, nw, maps["mlp_input"], maps["mlp_output"], dense_limit=limit,
                                         dtype=RANKING_DTYPE)
            result[name] = {"seconds": round(time.perf_counter() - start, 2),
                            "cpu_seconds": round(time.process_time() - cpu, 2), "mean_similarity": round(mean, 5)}
            matched[name] = dict(map(tuple, pairs_.tolist()))
        same = sum(matched["sparse"].get(a) == b for a, b in matched["dense"].items())
        result["same_assignment_share"] = round(same / max(1, len(matched["dense"])), 4)
        rows.append(result)
        print(json.dumps(result), flush=True)
    merge_json(RESULTS, {
        "command": "LORASUITE_BENCH_THREADS=%s .venv/bin/python benchmarks/neuron_matching_qwen.py %s"
                   % (torch.get_num_threads(), " ".join(f"--pairs {p}" for p in (args.pairs or []))),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gemm_2048_fp32_gflops": gemm_gflops(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__},
        "widths": {"old_neurons": old.dims.intermediate, "new_neurons": new.dims.intermediate,
                   "old_hidden": old.dims.hidden, "new_hidden": new.dims.hidden},
        "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "layers": rows})


if __name__ == "__main__":
    main()
