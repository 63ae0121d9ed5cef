"""Per-layer head similarity and neuron matching at Llama-2-7B -> Llama-3-8B shape, random weights.

Shapes: d 4096, 32 query heads of 128, kv heads 32 -> 8, ffn 11008 -> 14336. The new layer is a
function-preserving upgrade of the old one, so the matching can be checked against the truth:

    old model   random weights, but its 32 kv heads are 8 distinct ones each repeated 4 times
                (so that 8 kv heads can carry its function exactly)
    new model   residual rotated by a random orthogonal R (T_in = Rᵀ, T_out = R), kv groups and
                the query heads within them permuted, the 8 distinct kv heads kept once; neurons
                permuted with up/down sign flips, 3328 unrelated neurons added

Times ``matching.head_similarity`` + the Hungarian on heads, and ``matching.match_neurons``
(sketched candidates + sparse full matching), each ``--repeats`` times; reports FLOPs from
``matching.similarity_flops`` against the official LoRASuite formula's count, and whether the
true head, kv and neuron assignments were recovered. Weight construction is not timed.

Run against the code before the change (a git worktree on PYTHONPATH; its matching has no
``match_neurons``) it times the old head similarity and the old dense neuron similarity
(n_o × n_n, float32) only: the dense Hungarian on 11008 × 14336 is not run.

    .venv/bin/python benchmarks/scale_layer_7b.py --label after [--threads 2] [--repeats 3]
    git worktree add /tmp/lorasuite-before 898f7d4
    PYTHONPATH=/tmp/lorasuite-before .venv/bin/python benchmarks/scale_layer_7b.py --label before --repeats 1

``--unit-maps`` times instead the ``unit_maps`` stage's work for the same layer pair
(``unit_maps.role_maps``, every role, the true matching, float64 weights and residual maps) with the
W_old · T products in float64 and in float32 (``unit_maps.CARRY_DTYPE``), alternating, and reports
the FLOPs of those products, the achieved rates and the largest relative difference between the two
runs' maps and fits:

    .venv/bin/python benchmarks/scale_layer_7b.py --unit-maps --label unit_maps_carry --threads 1 --repeats 2

Each run merges its entry under its label into benchmarks/results/scale_layer_7b.json, with the
command and conditions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import lorasuite_core
from _common import merge_json
from lorasuite_core.transfer import matching
from lorasuite_core.models.loading import Dims
from lorasuite_core.transfer.matching import _kv_pairs, head_similarity

OLD = Dims(hidden=4096, num_layers=1, num_heads=32, num_kv_heads=32, head_dim=128, intermediate=11008, norm_eps=1e-5)
NEW = Dims(hidden=4096, num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336, norm_eps=1e-5)
DISTINCT_KV = 8


def build(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, hd, H, F_o, F_n = OLD.hidden, OLD.head_dim, OLD.num_heads, OLD.intermediate, NEW.intermediate

    def randn(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    rep = H // DISTINCT_KV                                   # old kv head h is distinct head h // rep
    kv_k, kv_v = randn(DISTINCT_KV, hd, d), randn(DISTINCT_KV, hd, d)
    old = {"q": randn(H * hd, d), "o": randn(d, H * hd),
           "k": kv_k.repeat_interleave(rep, 0).reshape(-1, d), "v": kv_v.repeat_interleave(rep, 0).reshape(-1, d),
           "gate": randn(F_o, d), "up": randn(F_o, d), "down": randn(d, F_o)}
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()

    # heads: new kv group p(g) holds distinct kv head g; its query heads are old group g's, permuted
    group_perm = torch.randperm(DISTINCT_KV, generator=g)            # old distinct group -> new kv head
    hpg = H // DISTINCT_KV
    head_to_new = torch.empty(H, dtype=torch.long)
    for grp in range(DISTINCT_KV):
        within = torch.randperm(hpg, generator=g)
        head_to_new[grp * hpg:(grp + 1) * hpg] = group_perm[grp] * hpg + within
    q_heads, o_heads = old["q"].reshape(H, hd, d), old["o"].T.reshape(H, hd, d)
    new_q, new_o = torch.empty_like(q_heads), torch.empty_like(o_heads)
    new_q[head_to_new], new_o[head_to_new] = q_heads, o_heads
    new_k, new_v = torch.empty_like(kv_k), torch.empty_like(kv_v)
    new_k[group_perm], new_v[group_perm] = kv_k, kv_v
    new = {"q": new_q.reshape(-1, d) @ R.T, "o": R @ new_o.reshape(-1, d).T,
           "k": new_k.reshape(-1, d) @ R.T, "v": new_v.reshape(-1, d) @ R.T}

    # neurons: permuted with up/down sign flips, unrelated extras
    perm = torch.randperm(F_n, generator=g)[:F_o]
    sign = torch.where(torch.rand(F_o, generator=g) < 0.5, -1.0, 1.0)
    gate, up, down = randn(F_n, d), randn(F_n, d), randn(d, F_n)
    gate[perm], up[perm], down[:, perm] = old["gate"] @ R.T, sign[:, None] * old["up"] @ R.T, sign * (R @ old["down"])
    new.update(gate=gate, up=up, down=down)
    truth = {"head_pairs": sorted((i, int(head_to_new[i])) for i in range(H)),
             "kv_pairs": sorted((grp * rep, int(group_perm[grp])) for grp in range(DISTINCT_KV)),
             "neuron_new_of_old": perm.numpy()}
    return old, new, R.T.contiguous(), R, truth


def git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def gemm_gflops(n: int = 4096, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate right now (n × n × n, ``dtype``), for context."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return round(2 * n ** 3 / (time.perf_counter() - start) / 1e9, 1)


CPU_SECONDS: dict[str, list[float]] = {}


def timed(fn, repeats, name):
    """Wall seconds per repeat; process CPU seconds go to CPU_SECONDS[name] (less sensitive to other jobs)."""
    seconds, result = [], None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        seconds.append(round(time.perf_counter() - start, 3))
        CPU_SECONDS.setdefault(name, []).append(round(time.process_time() - cpu, 3))
    return seconds, result


def carry_flops(do: Dims = OLD, dn: Dims = NEW) -> int:
    """FLOPs of role_maps' W_old · T products for one layer pair (q, k, v, gate, up: W_old T_in; o, down: T_out W_old)."""
    rows = do.num_heads * do.head_dim + 2 * do.num_kv_heads * do.head_dim + 2 * do.intermediate     # input-facing
    cols = do.num_heads * do.head_dim + do.intermediate                                             # output-facing
    return 2 * do.hidden * dn.hidden * (rows + cols)


def unit_maps_entry(args) -> dict:
    """role_maps for one 7B -> 8B layer pair, CARRY_DTYPE float64 against float32, alternating."""
    from lorasuite_core.transfer import unit_maps as U
    from lorasuite_core.transfer.matching import LayerMatch

    old, new, T_in, T_out, truth = build()
    old = {k: v.double() for k, v in old.items()}
    new = {k: v.double() for k, v in new.items()}
    maps = {"attention_input": T_in.double(), "mlp_input": T_in.double(),
            "attention_output": T_out.double(), "mlp_output": T_out.double()}
    match = LayerMatch(head_pairs=truth["head_pairs"], kv_pairs=truth["kv_pairs"],
                       neuron_pairs=np.stack([np.arange(OLD.intermediate), truth["neuron_new_of_old"]], 1),
                       head_similarity=None, neuron_similarity_mean=0.0)
    gemm = {"float32": gemm_gflops(), "float64": gemm_gflops(dtype=torch.float64),
            "bfloat16": gemm_gflops(dtype=torch.bfloat16)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    results, seconds = {}, {"float64": [], "float32": []}
    for _ in range(args.repeats):
        for name in ("float64", "float32"):
            U.CARRY_DTYPE = getattr(torch, name)
            took, results[name] = timed(lambda: U.role_maps(old, new, OLD, NEW, maps, match, "lstsq", T_in.double()),
                                        1, f"role_maps_carry_{name}")
            seconds[name] += took
            print(f"role_maps, carry {name}: {took[0]} s", flush=True)
    diff = max(float((results["float32"][r].M - results["float64"][r].M).norm() / results["float64"][r].M.norm())
               for r in results["float64"])
    flops = carry_flops()
    package = Path(lorasuite_core.__file__).resolve().parent
    return {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": _cpu_name(),
                    "note": "2-core VM shared with other jobs, no GPU", "gemm_4096_gflops_at_start": gemm,
                    "loadavg_1_5_15_at_start": load_before,
                    "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "package": str(package), "package_commit": git_commit(package.parent),
        "shapes": {"old": vars(OLD), "new": vars(NEW)},
        "part": "unit_maps.role_maps, every role, true matching, function-preserving upgrade",
        "seconds": seconds, "cpu_seconds": CPU_SECONDS,
        "carry_flops": flops,
        "carry_gflops_achieved_best": {k: round(flops / min(v) / 1e9, 1) for k, v in seconds.items()},
        "maps_relative_difference_max": diff,
        "fit": {name: {r: m.fit for r, m in res.items()} for name, res in results.items()},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="entry name in the JSON file: before / after")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale_layer_7b.json"))
    parser.add_argument("--unit-maps", action="store_true", help="time the unit maps' carry, float64 vs float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.unit_maps:
        entry = unit_maps_entry(args)
        print(json.dumps({k: entry[k] for k in ("seconds", "carry_gflops_achieved_best",
                                                "maps_relative_difference_max")}), flush=True)
        merge_json(args.out, {args.label: entry})
        return 0
    old, new, T_in, T_out, truth = build()
    gemm_before = gemm_gflops()
    load_before = [round(x, 2) for x in os.getloadavg()]

    # match_layer's matmul dtype (bfloat16 since issue 11); the code before it had none: float32
    ranking = getattr(matching, "RANKING_DTYPE", None)
    dtype_kw = {"dtype": ranking} if ranking is not None else {}

    def heads():
        sim = head_similarity(old, new, OLD, NEW, T_in, T_out, **dtype_kw)
        rows, cols = linear_sum_assignment(sim, maximize=True)
        pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
        return pairs, _kv_pairs(pairs, OLD, NEW, sim), sim

    head_seconds, (head_pairs, kv_pairs, sim) = timed(heads, args.repeats, "head_similarity_and_assignment")
    print(f"heads: {head_seconds} s", flush=True)
    # old kv heads 4g..4g+3 are copies: any of them is a correct source for new kv head p(g)
    rep = OLD.num_kv_heads // DISTINCT_KV
    kv_ok = sorted((i // rep, j) for i, j in kv_pairs) == sorted((t // rep, j) for t, j in truth["kv_pairs"])
    package = Path(lorasuite_core.__file__).resolve().parent
    entry = {
        "command": " ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                            + [".venv/bin/python", *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "note": "2-core VM shared with other jobs, no GPU"},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "dtype": str(ranking).replace("torch.", "") + " products, float32 sums" if ranking is not None else "float32",
        "package": str(package), "package_commit": git_commit(package.parent),
        "shapes": {"old": vars(OLD), "new": vars(NEW), "old_distinct_kv_heads": DISTINCT_KV},
        "seconds": {"head_similarity_and_assignment": head_seconds},
        "recovered": {"head_pairs": head_pairs == truth["head_pairs"], "kv_pairs": kv_ok},
        "head_similarity_of_matched_mean": round(float(np.mean([sim[i, j] for i, j in head_pairs])), 6),
    }
    if not hasattr(matching, "match_neurons"):            # the code before: dense similarity only
        dense_seconds, _ = timed(lambda: matching.neuron_similarity(old, new, T_in, T_out), args.repeats,
                                 "dense_neuron_similarity_without_hungarian")
        print(f"dense neuron similarity: {dense_seconds} s", flush=True)
        entry["seconds"]["dense_neuron_similarity_without_hungarian"] = dense_seconds
        entry["note"] = "dense Hungarian (linear_sum_assignment) on 11008 x 14336 not run"
        D, Rq, Rqn = NEW.hidden, OLD.num_heads * OLD.head_dim, NEW.num_heads * NEW.head_dim
        carry = 2 * OLD.hidden * D * (2 * Rq + 2 * OLD.num_kv_heads * OLD.head_dim)
        entry["flops"] = {"head_similarity_before": carry + 2 * D * 4 * Rq * Rqn,   # four query-level Grams
                          "neuron_similarity_dense": 2 * OLD.hidden * D * OLD.intermediate * 3
                          + 2 * OLD.intermediate * NEW.intermediate * D * 3}
    else:
        neuron_seconds, (neuron_pairs, neuron_mean) = timed(
            lambda: matching.match_neurons(old, new, T_in, T_out, **dtype_kw), args.repeats, "neuron_matching")
        print(f"neurons: {neuron_seconds} s", flush=True)
        flops = matching.similarity_flops(OLD, NEW)
        best_heads, best_neurons = min(head_seconds), min(neuron_seconds)
        entry["seconds"].update(neuron_matching=neuron_seconds, best_total=round(best_heads + best_neurons, 3))
        entry.update({
            "neuron_matching": {"dense_limit_pairs": matching.DENSE_NEURON_PAIRS, "sketch_dim": matching.SKETCH_DIM,
                                "top_k": matching.TOP_K},
            "flops": flops,
            "flops_ratio_official_head_over_ours": round(flops["official_head"] / flops["head_similarity"], 3),
            "achieved_gflops": {"heads": round(flops["head_similarity"] / best_heads / 1e9, 1),
                                "neurons": round(flops["neuron_similarity"] / best_neurons / 1e9, 1)},
            "neuron_similarity_mean": round(neuron_mean, 6),
        })
        entry["recovered"]["neuron_pairs"] = bool(
            len(neuron_pairs) == OLD.intermediate and np.array_equal(neuron_pairs[:, 0], np.arange(OLD.intermediate))
            and np.array_equal(neuron_pairs[:, 1], truth["neuron_new_of_old"]))
    entry["cpu_seconds"] = CPU_SECONDS
    entry["machine"]["loadavg_1_5_15_at_start"] = load_before
    entry["machine"]["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    entry["machine"]["gemm_4096_bfloat16_gflops_end"] = gemm_gflops(dtype=torch.bfloat16)
    entry["machine"]["gemm_4096_float32_gflops_start_end"] = [gemm_before, gemm_gflops()]
    print(json.dumps({k: entry.get(k) for k in ("seconds", "achieved_gflops", "recovered")}), flush=True)
    merge_json(args.out, {args.label: entry})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
