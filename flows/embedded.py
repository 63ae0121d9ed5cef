"""The embedded default: a private Prefect API for one CLI run when no server is configured.

Design
------
Prefect's own ephemeral server (``SubprocessASGIServer``) shares one sqlite file between every
run on the machine and gives up after ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(20 s): with both cores busy it timed out, overlapping runs logged "database is locked", its
telemetry service failed to reach the internet, and after ``kill -9`` of the CLI it kept
running.  :func:`embedded_api` instead starts, for one CLI run:

* the same ASGI app (``prefect.server.api.server:create_app`` under uvicorn, UI off) on a free
  127.0.0.1 port, as a child process that the kernel signals (``PR_SET_PDEATHSIG`` = SIGTERM)
  when the CLI dies for any reason, SIGKILL included; SIGINT/SIGTERM of the CLI stop it too;
* on its own sqlite database in a temporary directory (removed afterwards; one left by a run killed
  with SIGKILL is removed by the next run, :mod:`lorasuite_core.io.tempdirs`), so overlapping runs
  never contend for one file.  Creating the schema costs ~10 s, so the first run keeps a copy of
  its freshly migrated, still empty database as a template (``~/.cache/lorasuite/prefect/
  template-<prefect version>.db``, written atomically) and later runs start from a copy of it;
* with server analytics/telemetry off;
* waiting for ``/api/health`` up to ``LORASUITE_EMBEDDED_STARTUP_TIMEOUT`` seconds (default
  300: a busy machine is slow, not broken), its output going to the run's log file.

With ``PREFECT_API_URL`` set (a real server) nothing is started and runs report there.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io.tempdirs import clean_stale, make_private_tempdir

STARTUP_TIMEOUT_ENV = "LORASUITE_EMBEDDED_STARTUP_TIMEOUT"   # read through lorasuite_core.settings
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the signal handlers of the parent still stop the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


class EmbeddedServer:
    """One private Prefect API server process; see the module docstring."""

    def __init__(self, log: IO[bytes] | None = None, timeout: float | None = None):
        from lorasuite_core.settings import settings

        self.timeout = float(timeout or settings().embedded_startup_timeout)
        self.log = log
        self.port = _free_port()
        self.home = make_private_tempdir("prefect")    # removed by stop(), or by the next run after a kill
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def template() -> Path:
        import prefect

        return Path.home() / ".cache" / "lorasuite" / "prefect" / f"template-{prefect.__version__}.db"

    def start(self) -> None:
        import prefect

        database = self.home / "prefect.db"
        template = self.template()
        self.fresh = not template.is_file()
        if not self.fresh:
            shutil.copyfile(template, database)
        env = {**os.environ,
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
               "PREFECT_HOME": str(self.home)}
        env.pop("PREFECT_API_URL", None)
        sink = self.log if self.log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._wait_healthy()
        if self.fresh:   # schema just created, nothing run yet: keep it as the template
            self._save_template(database, template)

    @staticmethod
    def _save_template(database: Path, template: Path) -> None:
        import sqlite3

        with contextlib.suppress(OSError, sqlite3.Error):
            template.parent.mkdir(parents=True, exist_ok=True)
            partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
            source, target = sqlite3.connect(database), sqlite3.connect(partial)
            try:
                source.backup(target)     # a consistent snapshot even while the server runs
            finally:
                source.close()
                target.close()
            os.replace(partial, template)

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise LorasuiteError(f"the embedded Prefect API server exited with code "
                                         f"{self.process.returncode} while starting (see the log file)")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(0.2)
        self.stop()
        raise LorasuiteError(f"the embedded Prefect API server did not answer within {self.timeout:.0f} s "
                             f"(raise {STARTUP_TIMEOUT_ENV}, or point PREFECT_API_URL at a running server)")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _drain_prefect_clients()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)


def _drain_prefect_clients() -> None:
    """Send the run logs and events still queued in this process before the server goes away."""
    with contextlib.suppress(Exception):
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=15)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise SystemExit in the main thread, so ``finally`` blocks run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):   # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def embedded_api(log: IO[bytes] | None = None) -> Iterator[str | None]:
    """Run the body against a private API server unless ``PREFECT_API_URL`` names one; yields the URL."""
    configured = _configured_api_url()
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    clean_stale()     # homes of runs killed with SIGKILL (no finally ran)
    server = EmbeddedServer(log=log)
    with _stop_on_signals():
        try:
            server.start()
            with temporary_settings({PREFECT_API_URL: server.url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
                yield server.url
        finally:
            server.stop()
