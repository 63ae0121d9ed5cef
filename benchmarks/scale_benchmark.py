"""End-to-end scale benchmark: the real ``lorasuite migrate --no-lft`` CLI under ``/usr/bin/time -v``.

Part (a), ``qwen``: Qwen2.5-Coder-0.5B-Instruct -> Qwen2.5-Coder-1.5B-Instruct (the converted fp32
safetensors directories from ``lorasuite models fetch``), a rank-16 LoRA (alpha 32) on all seven
targets made by ``lorasuite_core.testing.adapter.make_random_lora_adapter`` (random non-zero A and B).

Part (b), ``synthetic``: Llama-2-7B -> Llama-3-8B-shaped llama checkpoints with random weights and
``--layers`` decoder layers (old: d 4096, 32 heads of 128, 32 kv heads, ffn 11008; new: d 4096, 32
heads, 8 kv heads, ffn 14336; both an 8192-token byte-level BPE vocabulary from
``testing.tokenizer.make_tokenizer`` padded with reserved tokens, untied lm_head).  Weights are written
tensor by tensor, one safetensors shard per decoder layer (N(0, 1/in) entries, norms near 1), so
writing a checkpoint never holds more than one layer; the adapter is the same rank-16 kind.

Each measurement is one fresh child process::

    /usr/bin/time -v lorasuite -q migrate --old-model OLD --new-model NEW --adapter A \
        --output OUT --no-lft --cache-root FRESH_DIR

with ``OMP_NUM_THREADS`` = torch threads = ``--threads`` (2) and ``PYTHONPATH`` = ``--repo`` (this
checkout by default; a ``git worktree`` of an older commit for "before" figures).  Recorded: the
CLI's JSON summary (``steps``: per stage seconds) and ``migration_report.json``'s ``steps``, the wall
time and "Maximum resident set size" of ``/usr/bin/time`` (file-backed pages of mmapped safetensors
included), the load average before and after, date, commit and the package's dirty files.  The
per-layer transfer seconds are the report's ``transfer`` step (the sum of the per-new-layer task
times) divided by the number of new layers.

    .venv/bin/python benchmarks/scale_benchmark.py qwen --label after
    .venv/bin/python benchmarks/scale_benchmark.py synthetic --layers 2 4 --label after
    .venv/bin/python benchmarks/scale_benchmark.py synthetic --layers 32 --weights-dtype bfloat16 --label L32   # 7B/8B end to end
    .venv/bin/python benchmarks/scale_benchmark.py activations --label LABEL [--repo CODE]   # stage alone

Each run merges its entries into ``benchmarks/results/scale_qwen.json`` / ``scale_synthetic.json``
under ``LABEL`` (``LABEL/L<layers>`` for the synthetic pair); ``benchmarks/SCALE.md`` is the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import child_rss_gb as _child_rss_gb, merge_json, parse_time_v as _parse_time_v
from scale_fixtures import (ALPHA, NEW_8B, OLD_7B, RANK, SYNTH_VOCAB, TARGETS, make_adapter, make_adapter_streamed,
                            write_synthetic_model)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODELS = Path(os.environ.get("LORASUITE_MODELS_DIR", Path.home() / ".cache" / "lorasuite" / "models"))
QWEN_OLD = MODELS / "qwen2.5-coder-0.5b-instruct" / "hf"
QWEN_NEW = MODELS / "qwen2.5-coder-1.5b-instruct" / "hf"
# Figures from the project's "scale" issue: commit 898f7d4, 1 torch thread, a busy 2-core machine.
QWEN_BEFORE_ISSUE = {
    "label": "before (issue text, 898f7d4)",
    "note": ("measured earlier at commit 898f7d4 under different load (1 torch thread on a busy 2-core machine), "
             "not in this session: copied from the project's scale issue, not re-measured here"),
    "commit": "898f7d4f4feec21f82acab977992da3b7f32cc11",
    "torch_threads": 1,
    "stage_seconds": {"head_similarity": 739, "activations": 515, "transfer_matrix": 140, "vocabulary": 34,
                      "cka": 12, "transfer": 2872},
    "pair_analysis_seconds": 24 * 60,
    "transfer_seconds_per_layer": 110,
    "peak_rss_gb": 8.4,
    "activations_rss_gb": 7.8,
    "calibration": {"paired_tokens": 1405, "asked": 2048},
}

PAIR_STAGES = ("vocabulary", "transfer_matrix", "activations", "cka", "layer_mapping", "head_similarity", "unit_maps")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False).stdout.strip()


def _code_identity(repo: Path) -> dict:
    """Commit and uncommitted package files of the measured code (a checkout, or a copied snapshot of one)."""
    snapshot = repo / "SNAPSHOT.json"
    if snapshot.is_file():   # a copy of a working tree (cp -r lorasuite_core flows tasks) with its commit
        return {"repo": str(repo), **json.loads(snapshot.read_text())}
    dirty = [ln[3:] for ln in _git(repo, "status", "--short").splitlines()
             if ln[3:].startswith(("lorasuite_core/", "flows/", "tasks/"))]
    return {"repo": str(repo), "commit": _git(repo, "rev-parse", "HEAD"), "dirty_package_files": dirty}


def _last_json(stdout: str):
    start = stdout.rfind("\n{")
    start = 0 if stdout.startswith("{") and start < 0 else start + 1
    try:
        return json.loads(stdout[start:])
    except (json.JSONDecodeError, ValueError):
        return None


def run_migrate(old: Path, new: Path, adapter: Path, work: Path, *, repo: Path, threads: int,
                timeout: float | None = None, fidelity: bool = True) -> dict:
    """One fresh ``/usr/bin/time -v lorasuite migrate --no-lft`` child; its stage seconds, wall time, peak RSS."""
    out, cache = work / "out", work / "cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = [str(REPO / ".venv" / "bin" / "lorasuite")]   # the installed entry point; PYTHONPATH picks the code
    args = ["-q", "migrate", "--old-model", str(old), "--new-model", str(new), "--adapter", str(adapter),
            "--output", str(out), "--no-lft", "--cache-root", str(cache)] + ([] if fidelity else ["--no-fidelity"])
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PREFECT_HOME=str(work / "prefect-home"))
    shown = f"OMP_NUM_THREADS={threads} PYTHONPATH={repo} /usr/bin/time -v lorasuite {' '.join(args)}"
    print(shown, flush=True)
    load_before, code = os.getloadavg(), _code_identity(repo)   # before the run: others may commit meanwhile
    start = time.time()
    samples: list[float] = []      # 1-minute load average every 10 s while the child runs
    rss: list[tuple[float, float]] = []   # (seconds since start, RSS GB of the timed CLI process) every 5 s
    with subprocess.Popen(["/usr/bin/time", "-v", *cli, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as child:
        import threading

        stop = threading.Event()

        def sample():
            tick = 0
            while not stop.wait(5):
                tick += 1
                if tick % 2 == 0:
                    samples.append(os.getloadavg()[0])
                gb = _child_rss_gb(child.pid)
                if gb is not None:
                    rss.append((round(time.time() - start, 1), gb))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        finally:
            stop.set()
            child.kill()
    done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    entry = {"command": shown, "returncode": done.returncode,
             "date": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(timespec="seconds"),
             "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
             "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
             "loadavg_1min_during": {"mean": round(sum(samples) / max(1, len(samples)), 2),
                                     "max": round(max(samples, default=0.0), 2), "samples": len(samples)},
             "rss_gb_every_5s": rss,
             "threads": {"OMP_NUM_THREADS": threads, "torch_threads": threads},
             "code": code,
             "time_v": _parse_time_v(done.stderr)}
    if done.returncode != 0:
        entry["stderr_tail"] = done.stderr[-3000:]
        print(done.stderr[-3000:], file=sys.stderr)
        return entry
    entry["summary"] = _last_json(done.stdout)
    report = json.loads((out / "migration_report.json").read_text())
    steps = {name: step["seconds"] for name, step in report["steps"].items()}
    new_layers = report["new_model"].get("num_layers") or len({j for _, j in report["layer_mapping"]})
    entry.update({
        "report_steps_seconds": steps,
        "pair_analysis_seconds": round(sum(steps.get(s, 0.0) for s in PAIR_STAGES), 1),
        "new_layers": new_layers,
        "transfer_seconds_per_layer": round(steps.get("transfer", 0.0) / new_layers, 3),
        "calibration": report.get("calibration"),
        "shared_vocabulary_size": report.get("shared_vocabulary_size"),
    })
    print(json.dumps({k: entry[k] for k in ("report_steps_seconds", "transfer_seconds_per_layer", "time_v")}),
          flush=True)
    return entry


def _merge(path: Path, updates: dict) -> None:
    merge_json(path, updates)


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "note": "2-core VM shared with other jobs (other engineers' tests and benchmarks), no GPU"}


# ------------------------------------------------------------------------------ synthetic checkpoints


# ------------------------------------------------------------------------------ parts


def part_qwen(args) -> None:
    work = Path(args.workdir) / "qwen"
    adapter = make_adapter(QWEN_OLD, work / "adapter")
    entry = run_migrate(QWEN_OLD, QWEN_NEW, adapter, work / args.label, repo=Path(args.repo).resolve(),
                        threads=args.threads, timeout=args.timeout, fidelity=not args.no_fidelity)
    entry["pair"] = {"old": str(QWEN_OLD), "new": str(QWEN_NEW)}
    entry["adapter"] = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "made_by": "testing.adapter.make_random_lora_adapter"}
    entry["machine"] = _machine()
    entry["benchmark_command"] = " ".join([".venv/bin/python", "benchmarks/scale_benchmark.py", *sys.argv[1:]])
    _merge(RESULTS / "scale_qwen.json", {"before_issue_898f7d4": QWEN_BEFORE_ISSUE, args.label: entry})


def part_synthetic(args) -> None:
    for layers in args.layers:
        suffix = "" if args.weights_dtype == "float32" else f"-{args.weights_dtype}"
        work = Path(args.workdir) / "synthetic" / f"L{layers}{suffix}"
        t = time.perf_counter()
        old = write_synthetic_model(work / "old", OLD_7B, layers, seed=1, dtype=args.weights_dtype)
        new = write_synthetic_model(work / "new", NEW_8B, layers, seed=2, dtype=args.weights_dtype)
        adapter = make_adapter_streamed(old, work / "adapter")
        print(f"L={layers}: fixtures ready in {time.perf_counter() - t:.0f} s", flush=True)
        if args.prepare_only:
            continue
        entry = run_migrate(old, new, adapter, work / args.label, repo=Path(args.repo).resolve(),
                            threads=args.threads, timeout=args.timeout, fidelity=not args.no_fidelity)
        entry["pair"] = {"old": {**OLD_7B, "num_hidden_layers": layers, "vocab_size": SYNTH_VOCAB},
                         "new": {**NEW_8B, "num_hidden_layers": layers, "vocab_size": SYNTH_VOCAB},
                         "weights": f"random N(0, 1/in), {args.weights_dtype}, one shard per layer"}
        entry["adapter"] = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                            "made_by": "testing.adapter.make_random_lora_adapter"}
        entry["machine"] = _machine()
        entry["benchmark_command"] = " ".join([".venv/bin/python", "benchmarks/scale_benchmark.py", *sys.argv[1:]])
        _merge(RESULTS / "scale_synthetic.json", {f"{args.label}/L{layers}{suffix}": entry})


ACTIVATIONS_CHILD = """
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from lorasuite_core.transfer.activations import builtin_calibration_texts, paired_activations
from lorasuite_core.models.loading import load_base_model
old, new = load_base_model(sys.argv[1]), load_base_model(sys.argv[2])
texts = builtin_calibration_texts()
start = time.perf_counter()
acts = paired_activations(old, new, texts, max_tokens=2048, progress=False)
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "paired_tokens": acts.num_tokens,
                  "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
                  "old_states": list(acts.old_states.shape), "new_states": list(acts.new_states.shape)}))
"""


def part_activations(args) -> None:
    """The activations stage alone (``paired_activations`` on the Qwen pair) in a fresh child of ``--repo``."""
    repo = Path(args.repo).resolve()
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(args.threads))
    load_before, code = os.getloadavg(), _code_identity(repo)
    done = subprocess.run([sys.executable, "-c", ACTIVATIONS_CHILD, str(QWEN_OLD), str(QWEN_NEW), str(args.threads)],
                          env=env, cwd=repo, capture_output=True, text=True, check=True)   # cwd: -c puts it first on sys.path
    entry = {"benchmark_command": " ".join([".venv/bin/python", "benchmarks/scale_benchmark.py", *sys.argv[1:]]),
             "what": "paired_activations(old, new, builtin_calibration_texts(), max_tokens=2048), the activations "
                     "stage's computation without the stage store; peak = the child's ru_maxrss (models' loading, "
                     "tokenizers, states)",
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
             "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
             "threads": args.threads, "code": code, "machine": _machine(),
             **_last_json(done.stdout)}
    print(json.dumps(entry, indent=1))
    _merge(RESULTS / "scale_qwen_activations.json", {args.label: entry})


# ------------------------------------------------------------------------------ SCALE.md

STAGE_COLUMNS = ("vocabulary", "transfer_matrix", "activations", "cka", "head_similarity", "transfer")


def _row(name: str, e: dict, target: str, met: str) -> str:
    if "report_steps_seconds" not in e:
        return f"| {name} | " + " | ".join(["—"] * (len(STAGE_COLUMNS) + 6)) + f" | {target} | {met} |"
    st = e["report_steps_seconds"]
    cells = [f"{st.get(c, 0):.0f}" for c in STAGE_COLUMNS]
    during = e.get("loadavg_1min_during")
    load = (f"{during['mean']:.1f} (max {during['max']:.1f})" if during else
            f"{e['loadavg_1_5_15_before'][0]:.1f} → {e['loadavg_1_5_15_after'][0]:.1f}")
    return (f"| {name} | " + " | ".join(cells) + f" | {e['transfer_seconds_per_layer']:.2f} | "
            f"{e['pair_analysis_seconds']:.0f} | {e['time_v']['wall_s']:.0f} | "
            f"{e['time_v']['user_s'] + e['time_v']['system_s']:.0f} | {e['time_v']['peak_rss_gb']:.2f} | "
            f"{load} | {target} | {met} |")


def render_table() -> str:
    head = ("| measurement | " + " | ".join(f"{c} s" for c in STAGE_COLUMNS)
            + " | transfer s / new layer | pair analysis s | wall s | CPU s (user + sys) | peak RSS GB "
            "| load, 1-min (mean during, or start → end) | target | met? |")
    lines = [head, "|" + " --- |" * (len(STAGE_COLUMNS) + 9)]
    qwen = json.loads((RESULTS / "scale_qwen.json").read_text()) if (RESULTS / "scale_qwen.json").is_file() else {}
    b = qwen.get("before_issue_898f7d4")
    if b:
        st = b["stage_seconds"]
        lines.append("| Qwen 0.5B→1.5B, 898f7d4 (issue text, 1 thread, busy machine, not re-measured) | "
                     + " | ".join(str(st.get(c, "—")) for c in STAGE_COLUMNS)
                     + f" | {b['transfer_seconds_per_layer']} | {b['pair_analysis_seconds']} | ≈{b['pair_analysis_seconds'] + st['transfer']} "
                     f"| {b['peak_rss_gb']} | busy | ≤ 300 s, ≤ 2 s/layer, ≤ 4 GB | no |")
    for label, e in qwen.items():
        if label.startswith("before") or "report_steps_seconds" not in e:
            continue
        ok = [e["time_v"]["wall_s"] <= 300, e["transfer_seconds_per_layer"] <= 2, e["time_v"]["peak_rss_gb"] <= 4]
        met = ", ".join(f"{what} {'yes' if flag else 'no'}" for what, flag in zip(("time", "per layer", "RSS"), ok))
        lines.append(_row(f"Qwen 0.5B→1.5B, {label}", e, "≤ 300 s, ≤ 2 s/layer, ≤ 4 GB", met))
    synth_path = RESULTS / "scale_synthetic.json"
    synth = json.loads(synth_path.read_text()) if synth_path.is_file() else {}
    for label, e in synth.items():
        if "report_steps_seconds" not in e:
            continue
        if e.get("new_layers") == 32:       # measured end to end: issue 23's target
            t = e["time_v"]
            met = f"time {'yes' if t['wall_s'] <= 900 else 'no'}, RSS {'yes' if t['peak_rss_gb'] <= 8 else 'no'}"
            lines.append(_row(f"7B→8B shape, {label}", e, "32 layers: ≤ 900 s, ≤ 8 GB", met))
            continue
        lines.append(_row(f"7B→8B shape, {label}", e, "(32 layers: ≤ 1800 s, ≤ 8 GB)", "see extrapolation"))
    lines += ["", "Extrapolation to 32 layers (7B→8B shape), linear in depth from the two deepest runs of each code:", "",
              "| code | from | wall s per layer | RSS GB per layer | 32 layers: wall s | 32 layers: peak RSS GB "
              "| ≤ 1800 s? | ≤ 8 GB? |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_code: dict[str, list[tuple[int, dict]]] = {}
    for label, e in synth.items():
        if "report_steps_seconds" in e:
            code, _, depth = label.rpartition("/L")
            by_code.setdefault(code, []).append((int(depth.split("-")[0]), e))
    for code, runs in by_code.items():
        runs.sort(key=lambda r: r[0])
        if len(runs) < 2:
            continue
        (l1, e1), (l2, e2) = runs[-2], runs[-1]
        dw = (e2["time_v"]["wall_s"] - e1["time_v"]["wall_s"]) / (l2 - l1)
        dr = (e2["time_v"]["peak_rss_gb"] - e1["time_v"]["peak_rss_gb"]) / (l2 - l1)
        w32 = e2["time_v"]["wall_s"] + dw * (32 - l2)
        r32 = e2["time_v"]["peak_rss_gb"] + max(dr, 0.0) * (32 - l2)
        lines.append(f"| {code} | L{l1}, L{l2} | {dw:.0f} | {dr:.2f} | {w32:.0f} | {r32:.1f} | "
                     f"{'yes' if w32 <= 1800 else 'no'} | {'yes' if r32 <= 8 else 'no'} |")
    acts_path = RESULTS / "scale_qwen_activations.json"
    if acts_path.is_file():
        lines += ["", "Activations stage alone (Qwen pair, `paired_activations`, fresh child, same session, 2 threads):", "",
                  "| code | seconds | peak RSS GB | paired tokens | load, 1-min (start → end) |", "| --- | --- | --- | --- | --- |"]
        for label, e in json.loads(acts_path.read_text()).items():
            lines.append(f"| {label} | {e['seconds']:.0f} | {e['ru_maxrss_gb']:.2f} | {e['paired_tokens']} | "
                         f"{e['loadavg_1_5_15_before'][0]:.1f} → {e['loadavg_1_5_15_after'][0]:.1f} |")
    layer_path = RESULTS / "scale_layer_7b.json"
    if layer_path.is_file():
        lines += ["", "Head similarity + neuron matching of one 7B→8B-shaped layer pair (`benchmarks/scale_layer_7b.py`, "
                  "function-preserving upgrade, best of the repeats; target ≤ 20 s):", "",
                  "| label | dtype | heads s | neurons s | total s | CPU s (heads + neurons, best) | recovered heads / kv / neurons "
                  "| float32 GEMM GFLOP/s (start, end) | load, 1-min (start → end) | ≤ 20 s? |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        entries = json.loads(layer_path.read_text())
        for label, e in entries.items():
            if "recovered" not in e:          # the unit maps' carry (--unit-maps), below
                continue
            sec, cpu, rec = e["seconds"], e.get("cpu_seconds", {}), e["recovered"]
            heads = min(sec["head_similarity_and_assignment"])
            neurons = min(sec["neuron_matching"]) if "neuron_matching" in sec else None
            total = heads + neurons if neurons is not None else None
            cpu_total = (min(cpu["head_similarity_and_assignment"]) + min(cpu["neuron_matching"])
                         if "neuron_matching" in cpu else None)
            machine = e["machine"]
            load = (f"{machine['loadavg_1_5_15_at_start'][0]:.1f} → " if "loadavg_1_5_15_at_start" in machine else "") \
                + f"{machine['loadavg_1_5_15_at_end'][0]:.1f}"
            fmt = lambda x: "—" if x is None else f"{x:.1f}"   # noqa: E731
            flags = " / ".join("yes" if rec.get(k) else ("—" if k not in rec else "no")
                               for k in ("head_pairs", "kv_pairs", "neuron_pairs"))
            gemm = ", ".join(f"{x:.0f}" for x in machine.get("gemm_4096_float32_gflops_start_end", []))
            lines.append(f"| {label} | {e.get('dtype', 'float32')} | {heads:.1f} | {fmt(neurons)} | {fmt(total)} | "
                         f"{fmt(cpu_total)} | {flags} | {gemm} | {load} | "
                         f"{'—' if total is None else ('yes' if total <= 20 else 'no')} |")
        carry = {label: e for label, e in entries.items() if "carry_flops" in e}
        if carry:
            lines += ["", "The unit maps of one 7B→8B-shaped layer pair (`scale_layer_7b.py --unit-maps`: "
                      "`unit_maps.role_maps`, every role, the true matching), the W_old·T products in float64 and in "
                      "float32, alternating in one process:", "",
                      "| label | carry TFLOP | float64 s | float32 s | carry FLOPs ÷ whole role_maps seconds, GFLOP/s (best; float64, float32) "
                      "| maps' largest relative difference | GEMM 4096² GFLOP/s (fp64, fp32, bf16) | threads | load at start |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for label, e in carry.items():
                g, rate = e["machine"]["gemm_4096_gflops_at_start"], e["carry_gflops_achieved_best"]
                lines.append(f"| {label} | {e['carry_flops'] / 1e12:.2f} | "
                             + " | ".join(", ".join(f"{x:.1f}" for x in e["seconds"][k]) for k in ("float64", "float32"))
                             + f" | {rate['float64']:.0f}, {rate['float32']:.0f} | {e['maps_relative_difference_max']:.1e}"
                             f" | {g['float64']:.0f}, {g['float32']:.0f}, {g['bfloat16']:.0f} | {e['torch_threads']} | "
                             f"{e['machine']['loadavg_1_5_15_at_start'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def part_table(args) -> None:
    path = REPO / "benchmarks" / "SCALE.md"
    text = path.read_text() if path.is_file() else "<!-- table -->\n<!-- /table -->\n"
    before, _, rest = text.partition("<!-- table -->")
    _, _, after = rest.partition("<!-- /table -->")
    path.write_text(before + "<!-- table -->\n" + render_table() + "<!-- /table -->" + after)
    print(render_table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["qwen", "synthetic", "activations", "table"])
    parser.add_argument("--label", default="after")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repo", default=str(REPO), help="code to measure (PYTHONPATH of the child)")
    parser.add_argument("--workdir", default="/tmp/lorasuite-scale")
    parser.add_argument("--timeout", type=float, help="seconds before the child is killed")
    parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="synthetic checkpoints' stored dtype (bfloat16: as real releases, half the disk)")
    parser.add_argument("--no-fidelity", action="store_true",
                        help="pass --no-fidelity (fidelity loads the old model whole in float32: 26 GB at 7B)")
    parser.add_argument("--prepare-only", action="store_true", help="write the synthetic checkpoints and adapters only")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    {"qwen": part_qwen, "synthetic": part_synthetic, "activations": part_activations,
     "table": part_table}[args.part](args)


if __name__ == "__main__":
    main()
