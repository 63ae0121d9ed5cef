"""Wall time and peak RSS of converting a fetched GGUF to the float32 HF directory, old code vs new.

Each measured run is a fresh ``/usr/bin/time -v python convert_benchmark.py --child ...`` process that
imports ``lorasuite_core`` from ``--repo`` (a checkout or ``git worktree`` of the code to measure) and
calls its ``fetch_model(name, cache_dir)``: that is ``lorasuite models fetch NAME`` minus the download,
because the verified GGUF is hard-linked into the run's cache dir first (the fetch re-checks its sha256,
then converts, verifies and writes the marker).  Peak RSS is ``/usr/bin/time``'s "Maximum resident set
size" of that process; it includes file-backed pages (mmapped GGUF and safetensors).

With two or more runs the outputs are compared tensor by tensor (one tensor in memory at a time): the
saved weights must be bit-identical whatever the code version.

Example (the committed result)::

    git worktree add /tmp/lorasuite-fetch-before 898f7d4   # + the model's KNOWN_MODELS entry, uncommitted
    .venv/bin/python benchmarks/convert_benchmark.py qwen2.5-coder-1.5b-instruct \\
        --run before=/tmp/lorasuite-fetch-before:/tmp/lorasuite-bench/before \\
        --run after=.:/tmp/lorasuite-bench/after \\
        --result benchmarks/results/convert_qwen2.5-coder-1.5b-instruct.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import parse_time_v as _parse_time_v

def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def measure(name: str, label: str, repo: Path, cache_dir: Path, source_cache: Path) -> dict:
    """One ``/usr/bin/time -v`` child converting ``name`` with the code in ``repo`` into ``cache_dir``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lorasuite_core.models.model_fetch import get_source

    gguf_name = get_source(name).gguf_filename
    root = cache_dir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.link(source_cache / name / gguf_name, root / gguf_name)  # verified GGUF reused: no download
    cmd = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), name, "--child",
           "--cache-dir", str(cache_dir)]
    env = dict(os.environ, PYTHONPATH=str(repo.resolve()))
    print(f"[{label}] {' '.join(cmd)}  (PYTHONPATH={env['PYTHONPATH']})", flush=True)
    load_before = os.getloadavg()
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    load_after = os.getloadavg()
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[{label}] conversion failed (exit {done.returncode})")
    marker = json.loads((root / "fetch_complete.json").read_text())
    result = {"label": label, "repo": str(repo.resolve()), "commit": _git(repo, "rev-parse", "HEAD"),
              "uncommitted_changes": _git(repo, "status", "--short", "--", "lorasuite_core"),
              "command": " ".join(cmd), "hf_dir": str(root / "hf"), **_parse_time_v(done.stderr),
              "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
              "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
              "marker_timings": marker["timings"], "conversion": marker["conversion"],
              "hf_files": sorted(p.name for p in (root / "hf").iterdir())}
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_rss_gib", "marker_timings")}), flush=True)
    return result


def compare_dirs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor equality of two safetensors directories (names, dtypes, shapes, values)."""
    import torch
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.update(dict.fromkeys(handle.keys(), path))
        return found

    left, right = index(a), index(b)
    different = []
    for tensor_name in sorted(set(left) & set(right)):
        with safe_open(str(left[tensor_name]), framework="pt") as x:
            p = x.get_tensor(tensor_name)
        with safe_open(str(right[tensor_name]), framework="pt") as y:
            q = y.get_tensor(tensor_name)
        if p.dtype != q.dtype or p.shape != q.shape or not torch.equal(p, q):
            different.append(tensor_name)
    same_files = [f.name for f in sorted(a.iterdir()) if not f.name.endswith((".safetensors", ".json"))
                  or f.name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")]
    files_identical = {f: (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes() for f in same_files}
    return {"a": str(a), "b": str(b), "tensors": len(left), "only_in_a": sorted(set(left) - set(right)),
            "only_in_b": sorted(set(right) - set(left)), "different_tensors": different,
            "bit_identical": not different and set(left) == set(right), "non_weight_files_identical": files_identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a KNOWN_MODELS name whose GGUF is already fetched in --source-cache")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=REPO:CACHE_DIR",
                        help="code to measure and the (scratch) cache dir it converts into; repeatable")
    parser.add_argument("--source-cache", default=str(Path.home() / ".cache" / "lorasuite" / "models"),
                        help="where the verified GGUF is (default ~/.cache/lorasuite/models)")
    parser.add_argument("--result", help="write the JSON result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # the measured process: exactly what `lorasuite models fetch NAME` runs
        from lorasuite_core.models.model_fetch import fetch_model
        print(fetch_model(args.name, Path(args.cache_dir)))
        return

    import torch
    import transformers

    runs = []
    for spec in args.run:
        match = re.fullmatch(r"([^=]+)=([^:]+):(.+)", spec)
        if not match:
            parser.error(f"--run {spec!r}: expected LABEL=REPO:CACHE_DIR")
        label, repo, cache = match.groups()
        runs.append(measure(args.name, label, Path(repo), Path(cache), Path(args.source_cache)))
    comparisons = [compare_dirs(Path(runs[0]["hf_dir"]), Path(r["hf_dir"])) for r in runs[1:]]
    result = {"model": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "conditions": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                             "memory_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                       / 2**30, 1),
                             "python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__, "platform": platform.platform(),
                             "note": "other engineers' jobs shared the 2 cores (see each run's load average); "
                                     "runs were sequential, nothing else of ours ran meanwhile"},
              "invocation": " ".join([Path(sys.executable).name, *sys.argv]), "runs": runs,
              "comparisons": comparisons}
    text = json.dumps(result, indent=2)
    if args.result:
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
