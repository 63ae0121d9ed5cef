"""The marginal adapter on the real Qwen pair: what a second adapter costs once the pair analysis is stored.

Qwen2.5-Coder-0.5B-Instruct -> Qwen2.5-Coder-1.5B-Instruct (the converted fp32 directories from
``lorasuite models fetch``), two rank-16 LoRAs (alpha 32, all seven targets, random non-zero A and B,
seeds 0 and 1: ``lorasuite_core.testing.adapter.make_random_lora_adapter``).  For one code checkout
(``--repo``: this one, or an exported copy of an older commit for "before"), two fresh child processes
over one stage store (``WORKDIR/store``, shared by every label, so the pair analysis is computed once)::

    nice -n 19 /usr/bin/time -v lorasuite -q migrate --old-model OLD --new-model NEW --adapter A_k \
        --output OUT --no-lft --no-fidelity --cache-root WORKDIR/store        (k = 0, then 1)

with ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``--threads`` (1) and ``PYTHONPATH`` = ``--repo``.
(``--seeds``: other seeds for a repeat; the store keeps every earlier entry, so a repeat needs a marginal
adapter not migrated before.)  The first adapter's run computes whatever pair stages the store lacks (for "after": the ``unit_maps``
stage); the second adapter is the marginal one.  Recorded per run: ``migration_report.json``'s
``steps`` (per stage seconds and computed/reused; the per-adapter part is ``transfer`` + ``write``),
the child's wall time and peak RSS (``/usr/bin/time -v``; the wall time includes the CLI's start-up
and its private Prefect API server), load averages before and after, and the code's commit.  Also the
machine: ``lscpu`` model name, torch threads, and a 2048² GEMM rate (fp32 and fp64) at ``--threads``.

    .venv/bin/python benchmarks/marginal_adapter.py --label before --repo /tmp/lorasuite-main
    .venv/bin/python benchmarks/marginal_adapter.py --label after
    .venv/bin/python benchmarks/marginal_adapter.py --label layers --layers 4     # in process, this checkout

``--layers N`` (after "after", in this process, this checkout's code): for the second adapter's first N
new layers, the per-layer transfer by the direct path (maps computed in the job, as before) and by the
cached path (the unit_maps entry's maps loaded and applied), each timed in wall and CPU seconds
(``time.process_time``: less sensitive to the other jobs on the machine), and whether the two give
equal tensors bit for bit on the real pair.

Results merge into ``benchmarks/results/marginal_adapter.json`` under ``LABEL``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import loadavg, merge_json, parse_time_v

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "marginal_adapter.json"
MODELS = Path(os.environ.get("LORASUITE_MODELS_DIR", Path.home() / ".cache" / "lorasuite" / "models"))
QWEN_OLD = MODELS / "qwen2.5-coder-0.5b-instruct" / "hf"
QWEN_NEW = MODELS / "qwen2.5-coder-1.5b-instruct" / "hf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
PER_ADAPTER = ("transfer", "write")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()


def _code(repo: Path) -> dict:
    snapshot = repo / "SNAPSHOT.json"       # an exported copy (git archive) records its commit here
    if snapshot.is_file():
        return {"repo": str(repo), **json.loads(snapshot.read_text())}
    return {"repo": str(repo), "commit": _git(repo, "rev-parse", "HEAD"),
            "dirty": [ln[3:] for ln in _git(repo, "status", "--short").splitlines()]}


def machine(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    rates = {}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        rates[str(dtype).replace("torch.", "")] = round(3 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9, 1)
    return {"cpu": name, "cpu_count": os.cpu_count(), "torch_threads": threads, "gemm_2048_gflops": rates,
            "torch": torch.__version__, "loadavg_1_5_15": loadavg(),
            "note": "2-core VM shared with other jobs (other engineers' tests and benchmarks); run under nice -n 19"}


def make_adapters(work: Path, seeds) -> list[Path]:
    from lorasuite_core.testing.adapter import make_random_lora_adapter

    out = []
    for seed in seeds:
        path = work / f"adapter-{seed}"
        if not (path / "adapter_model.safetensors").is_file():
            make_random_lora_adapter(QWEN_OLD, path, rank=RANK, alpha=ALPHA, seed=seed, targets=TARGETS)
        out.append(path)
    return out


def migrate(adapter: Path, out: Path, store: Path, repo: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["-q", "migrate", "--old-model", str(QWEN_OLD), "--new-model", str(QWEN_NEW), "--adapter", str(adapter),
            "--output", str(out), "--no-lft", "--no-fidelity", "--cache-root", str(store)]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PREFECT_HOME=str(out.parent / "prefect-home"))
    shown = f"OMP_NUM_THREADS={threads} PYTHONPATH={repo} nice -n 19 /usr/bin/time -v lorasuite {' '.join(args)}"
    print(shown, flush=True)
    before, start = loadavg(), time.time()
    done = subprocess.run(["nice", "-n", "19", "/usr/bin/time", "-v", str(Path(sys.executable).parent / "lorasuite"),
                           *args], env=env, capture_output=True, text=True)
    entry = {"command": shown, "returncode": done.returncode,
             "date": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(timespec="seconds"),
             "loadavg_1_5_15_before": before, "loadavg_1_5_15_after": loadavg(), "time_v": parse_time_v(done.stderr)}
    if done.returncode != 0:
        entry["stderr_tail"] = done.stderr[-3000:]
        print(done.stderr[-3000:], file=sys.stderr)
        return entry
    steps = json.loads((out / "migration_report.json").read_text())["steps"]
    entry["steps"] = steps
    entry["per_adapter_seconds"] = round(sum(steps[s]["seconds"] for s in PER_ADAPTER if s in steps), 2)
    print(json.dumps({"steps": steps, "per_adapter_seconds": entry["per_adapter_seconds"],
                      "wall_s": entry["time_v"]["wall_s"]}), flush=True)
    return entry


def layers(work: Path, count: int, threads: int) -> dict:
    import torch

    from lorasuite_core.models.loading import load_lora_adapter
    from lorasuite_core.pipeline import pair_stages, plans
    from lorasuite_core.pipeline.stage_store import StageStore
    from lorasuite_core.pipeline.unit_map_store import load_layer_maps
    from lorasuite_core.transfer.adapter import sources_by_new_layer, transfer_new_layer

    torch.set_num_threads(threads)
    plan = plans.plan_pair(str(QWEN_OLD), str(QWEN_NEW))
    store = StageStore.at(str(work / "store"))
    analysis = pair_stages.pair_analysis(store, plan, store.location("head_similarity", plan.stage_keys["head_similarity"]))
    maps_dir = store.local_dir(store.location("unit_maps", plan.stage_keys["unit_maps"]))
    old, new = plan.old(), plan.new()
    adapter = load_lora_adapter(str(work / "adapter-1"), old.family)      # the marginal adapter of before/after
    sources = sources_by_new_layer(analysis.layer_mapping, {layer for layer, _ in adapter.factors})
    rows = []
    for j in sorted(sources)[:count]:
        timed = {}
        for path in ("direct", "cached"):
            wall, cpu = time.perf_counter(), time.process_time()
            maps = None if path == "direct" else {i: load_layer_maps(maps_dir, i, j, "lstsq") for i in sources[j]}
            result = transfer_new_layer(old, new, analysis, adapter, j, sources[j], "lstsq", maps)
            timed[path] = (result, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3))
        equal = all(torch.equal(a.factors.A, b.factors.A) and torch.equal(a.factors.B, b.factors.B)
                    for a, b in zip(timed["direct"][0].modules, timed["cached"][0].modules))
        rows.append({"new_layer": j, "sources": sources[j], "bit_identical": equal,
                     **{f"{p}_wall_s": t[1] for p, t in timed.items()}, **{f"{p}_cpu_s": t[2] for p, t in timed.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "loadavg_1_5_15_after": loadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--repo", default=str(REPO), help="the code checkout to measure (PYTHONPATH of the children)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "marginal-adapter"))
    parser.add_argument("--layers", type=int, default=0, help="per-layer direct against cached, in this process")
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1],
                        help="the first and the marginal adapter's seeds (another marginal seed repeats a measurement)")
    args = parser.parse_args()
    work, repo = Path(args.workdir), Path(args.repo).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.layers:
        entry = {"machine": machine(args.threads), "code": _code(REPO), **layers(work, args.layers, args.threads),
                 "benchmark_command": " ".join(["nice -n 19 .venv/bin/python", "benchmarks/marginal_adapter.py",
                                                *sys.argv[1:]])}
        merge_json(RESULTS, {args.label: entry})
        return
    adapters = make_adapters(work, args.seeds)
    code = _code(repo)
    entry = {"machine": machine(args.threads), "code": code,
             "adapters": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "seeds": args.seeds,
                          "made_by": "testing.adapter.make_random_lora_adapter"},
             "benchmark_command": " ".join(["nice -n 19 .venv/bin/python", "benchmarks/marginal_adapter.py",
                                            *sys.argv[1:]])}
    entry["first_adapter"] = migrate(adapters[0], work / args.label / "out-0", work / "store", repo, args.threads)
    merge_json(RESULTS, {args.label: entry})
    entry["marginal_adapter"] = migrate(adapters[1], work / args.label / "out-1", work / "store", repo, args.threads)
    merge_json(RESULTS, {args.label: entry})


if __name__ == "__main__":
    main()
