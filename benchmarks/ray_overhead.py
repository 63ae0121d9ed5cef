"""Overhead of prefect-ray's RayTaskRunner against the default thread pool, on a tiny fleet migration.

Every configuration runs ``migrate-fleet`` in a fresh child process (``LORASUITE_TASK_RUNNER`` is
read when the flows are imported) on lorasuite's embedded Prefect API, twice: ``cold`` with an
empty stage store (every stage computed) and ``warm`` on the same store (the pair analysis and
per-layer entries reused, outputs overwritten).  Timed: the flow call alone (``flow_s``, Ray's
local cluster start included for ``ray``) and the child process from start to exit (``process_s``:
imports, API server, flow).  Tiny llama pair (hidden 64, 3 -> 4 layers, heads permuted), N adapters
of rank 4, 256 calibration tokens; the work itself is milliseconds per task, so the difference
is the runner's cost per run and per task.

    python benchmarks/ray_overhead.py [--adapters 4] [--repeats 2]   # -> benchmarks/results/ray_overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ray_overhead.json"
RUNNERS = {"threads": "threads", "ray": "ray"}


def child(manifest: str, cache: str, overwrite: bool) -> None:
    started = time.perf_counter()
    from flows.embedded import embedded_api
    from flows.migration import migrate_fleet

    imported = time.perf_counter()
    with embedded_api():
        t0 = time.perf_counter()
        state = migrate_fleet(manifest=manifest, overwrite=overwrite, cache_root=cache, return_state=True)
        flow_s = time.perf_counter() - t0
    summary = state.result(raise_on_failure=False)
    print(json.dumps({"flow_s": round(flow_s, 2), "import_s": round(imported - started, 2),
                      "state": state.type.value, "published": len(summary["published"]),
                      "task_runner": type(migrate_fleet.task_runner).__name__}))


def build(root: Path, adapters: int) -> Path:
    import yaml

    from lorasuite_core.testing.adapter import make_random_lora_adapter
    from lorasuite_core.testing.model import make_tiny_model_dir
    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, identity_layers=(1,)))
    entries = [{"name": f"a{i}", "adapter": str(make_random_lora_adapter(old, root / f"a{i}", rank=4, alpha=8,
                                                                          seed=10 + i))} for i in range(adapters)]
    manifest = root / "fleet.yaml"
    manifest.write_text(yaml.safe_dump({"old_model": str(old), "new_model": str(new), "output_root": str(root / "out"),
                                        "analysis": {"max_calibration_tokens": 256}, "adapters": entries}))
    return manifest


def measure(runner: str, manifest: Path, cache: Path, overwrite: bool) -> dict:
    env = dict(os.environ, LORASUITE_TASK_RUNNER=runner, RAY_USAGE_STATS_ENABLED="0",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(manifest), str(cache)]
    command += ["--overwrite"] if overwrite else []
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{runner}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": round(process_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MANIFEST", "CACHE"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.overwrite)
    import ray
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="lorasuite-ray-bench-") as tmp:
        manifest = build(Path(tmp), args.adapters)
        for repeat in range(args.repeats):
            for runner in RUNNERS:
                cache = Path(tmp) / f"cache-{runner}-{repeat}"
                for phase in ("cold", "warm"):
                    row = {"runner": runner, "repeat": repeat, "phase": phase,
                           **measure(runner, manifest, cache, overwrite=True)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)

    def median(runner: str, phase: str, key: str) -> float:
        values = sorted(r[key] for r in rows if r["runner"] == runner and r["phase"] == phase)
        return values[len(values) // 2]

    summary = {phase: {key: {"threads": median("threads", phase, key), "ray": median("ray", phase, key),
                             "ray_minus_threads": round(median("ray", phase, key) - median("threads", phase, key), 2)}
                       for key in ("flow_s", "process_s")} for phase in ("cold", "warm")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python benchmarks/ray_overhead.py " + shlex.join(sys.argv[1:]),
        "conditions": {"adapters": args.adapters, "repeats": args.repeats, "cpus": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                       "ray": ray.__version__, "torch": torch.__version__,
                       "machine": "shared 2-core CI box, other jobs running (timings are noisy)",
                       "pair": "tiny llama, hidden 64, 3 -> 4 layers (one inserted), 256 calibration tokens"},
        "summary_median_s": summary, "runs": rows}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
