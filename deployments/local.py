"""A local Prefect stack for the shipped deployments: server, pools, deployments, worker.

    python -m deployments.local up [--port 4200] [--home runs/prefect-server]   # = make serve
    python -m deployments.local status | down                                   # = make serve-down
    python -m deployments.local pools [--gpu]          # the work pools, on any PREFECT_API_URL
    python -m deployments.local deploy [--gpu]         # prefect deploy of deployments/prefect.yaml

Design / data flow of ``up`` (each step idempotent; a second ``up`` reuses what runs):

1. **Server**: ``prefect server start --host 127.0.0.1 --port PORT`` as a detached background process
   (own session, survives the command), ``PREFECT_HOME`` = ``HOME/prefect`` (its sqlite database,
   profiles), ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, and the UI's API address derived from PORT
   (``PREFECT_UI_API_URL``, ``PREFECT_SERVER_API_PORT``, :func:`server_env`); output in
   ``HOME/server.log``, pid in ``HOME/server.pid``.  Ready when ``/api/health`` answers (up to
   ``--timeout`` s).
2. **Pools**: ``lorasuite-process`` (type ``process``, Prefect's default job template) through the
   client, an existing pool left as it is; ``--gpu`` adds ``lorasuite-gpu`` (same type, its runs get
   ``PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS=4``).
3. **Variables** (only those given): ``--fleet-manifest`` -> ``lorasuite_fleet_manifest``,
   ``--cache-root`` -> ``lorasuite_cache_root`` (see ``deployments/steps.py``, ``deployments/nightly.py``).
4. **Deployments**: ``prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml`` from the
   repository root: the documented command, nothing generated; ``deploy --gpu`` then moves the fleet
   deployments to the GPU pool.
5. **Worker**: ``prefect worker start --pool lorasuite-process`` in the background (``HOME/worker.log``,
   ``HOME/worker.pid``); its flow runs inherit this environment (``LORASUITE_CACHE_ROOT``, ``AWS_*``).

``down`` stops the worker, then the server (SIGTERM to each process group, SIGKILL after 20 s).  The
server and worker get ``PREFECT_API_URL`` = this server; this process talks to it the same way.
Bad input and failures end as one ``lorasuite: error: ...`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lorasuite_core.errors import LorasuiteError

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "prefect.yaml"
DEFAULT_HOME = Path("runs") / "prefect-server"
DEFAULT_PORT = 4200
PROCESS_POOL = "lorasuite-process"
GPU_POOL = "lorasuite-gpu"
GPU_ENV = {"PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS": "4"}
GPU_DEPLOYMENTS = ("migrate-fleet-nightly", "on-base-model-release")
FLEET_MANIFEST_VARIABLE = "lorasuite_fleet_manifest"
CACHE_ROOT_VARIABLE = "lorasuite_cache_root"


# --------------------------------------------------------------------------- processes


def api_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api"


def _prefect() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def stack_env(home: Path, url: str | None) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # no spinning OpenMP threads on a shared CPU (EVAL_THROUGHPUT.md)
    env.pop("PREFECT_API_KEY", None)        # a local server takes no key; never pass one on
    if url:
        env["PREFECT_API_URL"] = url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def server_env(home: Path, port: int) -> dict[str, str]:
    """The server's environment: every address derived from ``port``.  The UI asks ``/ui-settings`` where
    the API is, and the server answers ``PREFECT_UI_API_URL``, else ``PREFECT_SERVER_API_HOST/PORT``
    (default 4200), not the ``--port`` it was started with: without these, ``make serve PORT=4321``
    served a UI that called port 4200."""
    url = api_url(port)
    return {**stack_env(home, None), "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": url, "PREFECT_UI_URL": url.removesuffix("/api")}


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _spawn(name: str, command: list[str], home: Path, env: dict[str, str]) -> int:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (home / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(url: str, home: Path, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if _pid(home / "server.pid") != pid:
            tail = (home / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise LorasuiteError(f"prefect server exited during start-up ({home / 'server.log'}): {' | '.join(tail)}")
        if time.monotonic() > deadline:
            raise LorasuiteError(f"prefect server at {url} not healthy after {timeout:.0f} s (see {home / 'server.log'})")
        time.sleep(1)


def start_server(home: Path, port: int, timeout: float, ui: bool = True) -> str:
    url = api_url(port)
    pid = _pid(home / "server.pid")
    if pid is None:
        if healthy(url):
            raise LorasuiteError(f"port {port} already serves a Prefect API not started here; choose --port")
        command = [*_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        pid = _spawn("server", command + ([] if ui else ["--no-ui"]), home, server_env(home, port))
        print(f"prefect server starting (pid {pid}, log {home / 'server.log'})", flush=True)
    wait_healthy(url, home, pid, timeout)
    return url


def start_worker(home: Path, url: str, pool: str = PROCESS_POOL) -> int:
    name = "worker" if pool == PROCESS_POOL else f"worker-{pool}"
    pid = _pid(home / f"{name}.pid")
    if pid is None:
        pid = _spawn(name, [*_prefect(), "worker", "start", "--pool", pool, "--type", "process"], home,
                     stack_env(home, url))
        print(f"worker on {pool} started (pid {pid}, log {home / f'{name}.log'})", flush=True)
    return pid


def stop(home: Path, name: str, grace: float = 20.0) -> bool:
    pid = _pid(home / f"{name}.pid")
    if pid is None:
        (home / f"{name}.pid").unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)      # its own session: the group is the process and its children
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            break
    (home / f"{name}.pid").unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)      # our child (tests): reap it
        if finished:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                               # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------- API objects


def _client_call(url: str | None, fn):
    """Run ``fn(client)`` with Prefect's sync client on ``url`` (None: the configured API)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: url} if url else {}
    with temporary_settings(updates=updates):
        with get_client(sync_client=True) as client:
            return fn(client)


def ensure_pools(url: str | None, gpu: bool = False) -> list[str]:
    """Create the process pool (and with ``gpu`` the GPU pool); existing pools are left as they are."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []

    def create(client):
        for name in (PROCESS_POOL, GPU_POOL) if gpu else (PROCESS_POOL,):
            template = ProcessWorker.get_default_base_job_template()
            if name == GPU_POOL:
                template["variables"]["properties"]["env"]["default"] = dict(GPU_ENV)
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template,
                                                       description=f"lorasuite {name} (process workers)"))
                created.append(name)
            except ObjectAlreadyExists:
                pass
    _client_call(url, create)
    return created


def set_variables(url: str | None, values: dict[str, str | None]) -> None:
    from prefect.variables import Variable
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        for name, value in values.items():
            if value:
                Variable.set(name, value, overwrite=True)


def deploy(url: str | None, home: Path | None = None, gpu: bool = False) -> None:
    """``prefect deploy`` of the shipped file (all three on the process pool; ``gpu``: fleet flows moved)."""
    env = stack_env(home, url) if home else dict(os.environ, **({"PREFECT_API_URL": url} if url else {}))
    commands = [[*_prefect(), "deploy", "--no-prompt", "--all", "--prefect-file", str(PREFECT_FILE)]]
    if gpu:           # one at a time: prefect deploy ignores --pool when it deploys several
        commands += [[*_prefect(), "deploy", "--no-prompt", "--prefect-file", str(PREFECT_FILE), "--name", name,
                      "--pool", GPU_POOL] for name in GPU_DEPLOYMENTS]
    for command in commands:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
            raise LorasuiteError(f"prefect deploy failed (exit {done.returncode}): {tail}")


def deployment_names(url: str | None) -> list[str]:
    return sorted(d.name for d in _client_call(url, lambda client: client.read_deployments()))


# --------------------------------------------------------------------------- commands


def up(home: Path, port: int, *, timeout: float = 300.0, gpu: bool = False, worker: bool = True, ui: bool = True,
       fleet_manifest: str | None = None, cache_root: str | None = None) -> str:
    home = home.resolve()
    url = start_server(home, port, timeout, ui=ui)
    ensure_pools(url, gpu=gpu)
    set_variables(url, {FLEET_MANIFEST_VARIABLE: fleet_manifest, CACHE_ROOT_VARIABLE: cache_root})
    deploy(url, home, gpu=gpu)
    if worker:
        start_worker(home, url)
    (home / "api_url").write_text(url)
    print(f"lorasuite: deployments {', '.join(deployment_names(url))} on {url}\n"
          f"  UI: {url.removesuffix('/api')}    use it: export PREFECT_API_URL={url}\n"
          f"  stop: make serve-down (= .venv/bin/python -m deployments.local down --home {home})", flush=True)
    return url


def down(home: Path) -> None:
    home = home.resolve()
    for name in sorted(p.stem for p in home.glob("worker*.pid")) + ["server"]:
        if stop(home, name):
            print(f"stopped {name}", flush=True)


def status(home: Path) -> dict:
    home = home.resolve()
    url = (home / "api_url").read_text().strip() if (home / "api_url").exists() else None
    found = {p.stem: _pid(p) for p in sorted(home.glob("*.pid"))}
    return {"api_url": url, "healthy": bool(url and healthy(url)), "processes": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--home", type=Path, default=ROOT / DEFAULT_HOME, help="state directory (default %(default)s)")
        if name == "up":
            p.add_argument("--port", type=int, default=DEFAULT_PORT)
            p.add_argument("--timeout", type=float, default=300.0, help="seconds the server may take to start")
            p.add_argument("--gpu", action="store_true", help="also the GPU pool, fleet deployments on it")
            p.add_argument("--no-worker", dest="worker", action="store_false")
            p.add_argument("--no-ui", dest="ui", action="store_false")
            p.add_argument("--fleet-manifest", help=f"sets the Prefect Variable {FLEET_MANIFEST_VARIABLE}")
            p.add_argument("--cache-root", help=f"sets the Prefect Variable {CACHE_ROOT_VARIABLE}")
    for name in ("pools", "deploy"):
        p = sub.add_parser(name, help="against $PREFECT_API_URL")
        p.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.home, args.port, timeout=args.timeout, gpu=args.gpu, worker=args.worker, ui=args.ui,
               fleet_manifest=args.fleet_manifest, cache_root=args.cache_root)
        elif args.command == "down":
            down(args.home)
        elif args.command == "status":
            print(json.dumps(status(args.home), indent=2))
        elif args.command == "pools":
            print("created:", ", ".join(ensure_pools(None, gpu=args.gpu)) or "nothing (all exist)")
        else:
            deploy(None, gpu=args.gpu)
    except LorasuiteError as error:
        print(f"lorasuite: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
