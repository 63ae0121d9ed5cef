"""Peak memory of reading a calibration file (reliability issue, finding B).

Measures the peak RSS (``/usr/bin/time -v``, "Maximum resident set size") of a fresh Python
process that imports ``lorasuite_core.transfer.activations`` and calls ``read_calibration_file`` on one
file, optionally followed by what the activations stage does next with the texts: tokenising
each with offsets, truncated to 256 tokens (``_token_ends`` with a small byte-level BPE tokenizer
from ``lorasuite_core.testing.tokenizer.make_tokenizer``).  ``--reader-from REV`` loads ``activations.py``
as it was at git revision ``REV`` (the "before" measurement); the default is the working tree.
The import-only baseline (torch etc.) is measured the same way, so the reader's own share is
``peak - baseline``.

    python benchmarks/calibration_reader_memory.py --make-single-line 17 --file /tmp/calib.txt \\
        --reader-from f216be4 --reader-from WORKTREE --out benchmarks/results/calibration_reader_memory.json
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"


def _load_reader(rev: str):
    if rev == WORKTREE:
        from lorasuite_core.transfer import activations

        return activations
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:lorasuite_core/transfer/activations.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "activations_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lorasuite_core._activations_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _child(args) -> None:
    sys.path.insert(0, str(REPO))
    module = _load_reader(args.rev)
    tokenizer = None
    if args.tokenize:
        from lorasuite_core.testing.tokenizer import make_tokenizer

        tokenizer = make_tokenizer("byte_bpe", tempfile.mkdtemp())
    if args.baseline:
        print(json.dumps({"texts": 0}))
        return
    start = time.perf_counter()
    # the budget of the recorded runs (the options' default max_calibration_tokens); passed only where the
    # reader at --reader-from takes it (it became a required parameter)
    budget = {"max_tokens": 2048} if "max_tokens" in inspect.signature(module.read_calibration_file).parameters else {}
    texts = module.read_calibration_file(args.file, **budget)
    read_s = time.perf_counter() - start
    tokens = 0
    if tokenizer is not None:
        for text in texts:
            tokens += len(module._token_ends(tokenizer, text, 256)[0])
    print(json.dumps({"texts": len(texts), "chars": sum(map(len, texts)), "max_text_chars": max(map(len, texts)),
                      "read_s": round(read_s, 3), "tokens": tokens, "seconds": round(time.perf_counter() - start, 3)}))


def _measure(argv: list[str]) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", *argv]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"command": " ".join(command[:2] + ["python"] + command[3:]), "peak_rss_mib": round(peak_kb / 1024, 1),
            **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", required=True)
    parser.add_argument("--make-single-line", type=float, metavar="MB", help="first write a one-line file of MB MiB")
    parser.add_argument("--reader-from", action="append", metavar="REV", help=f"git revision or {WORKTREE}")
    parser.add_argument("--out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rev", default=WORKTREE, help=argparse.SUPPRESS)
    parser.add_argument("--tokenize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.make_single_line:
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "delta", "residual", "stream", "layer", "token"]
        size = int(args.make_single_line * 2**20)
        with open(args.file, "w") as handle:
            written = 0
            while written < size:
                chunk = " ".join(rng.choice(words) for _ in range(100_000)) + " "
                handle.write(chunk[: size - written])
                written += len(chunk[: size - written])
            handle.write("\n")
    runs = []
    for rev in args.reader_from or [WORKTREE]:
        shown = rev if rev == WORKTREE else subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                                                           check=True, capture_output=True, text=True).stdout.strip()
        for tokenize in (False, True):
            extra = ["--tokenize"] if tokenize else []
            row = {"reader": shown, "tokenize": tokenize,
                   "baseline_peak_rss_mib": _measure(["--file", args.file, "--rev", rev, "--baseline", *extra])[
                       "peak_rss_mib"],
                   **_measure(["--file", args.file, "--rev", rev, *extra])}
            row["reader_share_mib"] = round(row["peak_rss_mib"] - row["baseline_peak_rss_mib"], 1)
            runs.append(row)
            print(json.dumps(row))
    result = {
        "file": {"path": args.file, "bytes": os.path.getsize(args.file),
                 "lines": sum(chunk.count(b"\n") for chunk in iter(lambda f=open(args.file, "rb"): f.read(2**20), b""))},
        "conditions": {"python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "note": "shared 2-core machine; peak RSS of a fresh process"},
        "invocation": " ".join(["python", "benchmarks/calibration_reader_memory.py", *sys.argv[1:]]),
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
