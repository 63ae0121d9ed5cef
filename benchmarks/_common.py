"""Helpers shared by the benchmark scripts (imported as ``_common``: the scripts run as
``.venv/bin/python benchmarks/NAME.py``, which puts this folder first on ``sys.path``).

* :func:`parse_time_v` reads GNU ``/usr/bin/time -v``'s report (stderr of the timed child):
  wall time, peak RSS ("Maximum resident set size", kB), user/system CPU seconds, CPU share.
* :func:`merge_json` merges entries into a results file (read, update, write to a temporary
  file, rename), so an interrupted run leaves the previous file or the new one, never half of
  one, and every finished measurement is kept as soon as it is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TIME_FIELDS = {"Maximum resident set size (kbytes)": "peak_rss_kb",
               "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
               "User time (seconds)": "user_s", "System time (seconds)": "system_s",
               "Percent of CPU this job got": "cpu_percent"}


def wall_seconds(text: str) -> float:
    """``h:mm:ss`` or ``m:ss(.ss)`` -> seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_v(stderr: str) -> dict:
    """The fields of TIME_FIELDS from ``/usr/bin/time -v`` output; peak RSS also in GB (10⁹) and GiB."""
    found = {}
    for line in stderr.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            found[TIME_FIELDS[key]] = value.strip()
    missing = [k for k in ("wall", "peak_rss_kb", "user_s", "system_s") if k not in found]
    if missing:
        raise ValueError(f"no /usr/bin/time -v report in the child's stderr (missing {', '.join(missing)})")
    kb = int(found["peak_rss_kb"])
    return {"wall_s": round(wall_seconds(found["wall"]), 1), "peak_rss_kb": kb,
            "peak_rss_gb": round(kb * 1024 / 1e9, 2), "peak_rss_gib": round(kb / 2**20, 2),
            "user_s": float(found["user_s"]), "system_s": float(found["system_s"]),
            "cpu_percent": found.get("cpu_percent")}


def merge_json(path: str | Path, updates: dict) -> dict:
    """Merge ``updates`` (label -> entry) into the JSON object at ``path``, atomically; returns the result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(updates)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` gives it (the machine varies: record it with every result)."""
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def gemm_gflops(dtype=None, n: int = 2048) -> float:
    """GFLOP/s of an n × n matrix product in ``dtype`` (default float32) at the current torch thread count."""
    import time

    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return round(3 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9, 1)


def child_rss_gb(time_pid: int) -> float | None:
    """Resident set (GB) of the process ``/usr/bin/time`` (pid ``time_pid``) runs, from /proc; None if gone."""
    try:
        children = Path(f"/proc/{time_pid}/task/{time_pid}/children").read_text().split()
        for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except (OSError, IndexError, ValueError):
        return None
    return None


def run_rss_traced(cmd: list[str], *, env: dict, cwd, every_s: float = 5.0):
    """Run ``/usr/bin/time -v CMD``; return (returncode, stdout, stderr, trace).

    ``trace``: the timed child's resident set every ``every_s`` seconds, and at each line it writes to stderr
    (a finished stage's terminal line), as ``[seconds since start, RSS GB, the line or ""]`` rows.
    """
    import subprocess
    import threading
    import time

    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    trace, err_lines, out_chunks, done = [], [], [], threading.Event()

    def rss_gb():
        return child_rss_gb(proc.pid)

    def sample():
        while not done.wait(every_s):
            trace.append([round(time.perf_counter() - start, 1), rss_gb(), ""])

    def read_err():
        for line in proc.stderr:
            err_lines.append(line)
            trace.append([round(time.perf_counter() - start, 1), rss_gb(), line.rstrip()[:120]])

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    out_chunks.append(proc.stdout.read())
    proc.wait()
    done.set()
    threads[1].join()
    return proc.returncode, "".join(out_chunks), "".join(err_lines), trace
