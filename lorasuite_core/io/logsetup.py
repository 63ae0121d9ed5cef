"""Where the CLI's log lines go: a log file for everything, the terminal for lorasuite's own lines.

Design
------
* **Log file.** Every record (lorasuite, Prefect, the embedded API server, libraries) goes to
  ``$LORASUITE_LOG_DIR/<UTC time>-<command>-<pid>.log`` (default ``~/.cache/lorasuite/logs``),
  tracebacks included; the CLI names the file in its last log line and, for an unexpected error,
  in its error line.  Files older than :data:`KEEP_DAYS` (14) days are removed.
* **Terminal.** Only records of the ``lorasuite*`` loggers (INFO, WARNING under ``-q``), as bare
  messages (``warning: …`` for a warning): one line per stage with its time and one progress bar
  (:class:`lorasuite_core.io.terminal.TerminalHandler`), one-line warnings.  Prefect's own console
  output (run banners, task tracebacks, the temporary server's chatter) is not shown, so a failure
  ends with exactly one ``lorasuite: error: …`` line.  Content hashes and store paths are DEBUG
  lines (the ``lorasuite*`` loggers are at DEBUG, so the log file has them): the terminal shows
  them under ``--verbose``, which shows everything at DEBUG, in the log file's format.
* **Warnings.** ``warnings`` go through logging (``logging.captureWarnings``, logger ``py.warnings``):
  into the log file, never onto the terminal as long as they are deprecation notices
  (:class:`DeprecationNoise`: FutureWarning, DeprecationWarning, PendingDeprecationWarning of
  transformers, Prefect, PEFT…), not even under ``--verbose``.
* **Prefect.** The same configuration is handed to Prefect through ``PREFECT_LOGGING_SETTINGS_PATH``
  (a JSON file, valid YAML), extended with Prefect's API handlers so flow and task run logs still
  reach the Prefect server (UI).  This module only writes that file; it never imports Prefect.
* **Secrets.** Every handler formats through :class:`RedactingFormatter` or the
  :class:`RedactSecrets` filter, which pass the whole text — message and traceback — through
  :func:`lorasuite_core.io.uris.redact_text` (URL user-info, query strings, access-key ids and the
  values of the AWS secret variables and of credentials seen in URIs).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from lorasuite_core.io.uris import redact_text
from lorasuite_core.io.terminal import TerminalHandler

KEEP_DAYS = 14
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class RedactSecrets(logging.Filter):
    """Rewrites a record so that any handler (Prefect's API handler included) sees redacted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


FILE_ONLY = {"file_only": True}
"""``extra=`` of a record meant for the log file only (a traceback behind a one-line error)."""


class OnlyLorasuite(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        return record.name == "lorasuite" or record.name.startswith(("lorasuite.", "lorasuite_core"))


DEPRECATION = re.compile(r"\b\w*(FutureWarning|DeprecationWarning)\b:")


class DeprecationNoise(logging.Filter):
    """Drops a captured deprecation warning (``py.warnings``: ``file:line: FutureWarning: …``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "py.warnings" and DEPRECATION.search(str(record.msg)))


class TerminalFormatter(RedactingFormatter):
    """The bare message; ``warning: …`` / ``error: …`` above INFO."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def log_path(command: str) -> Path:
    from lorasuite_core.settings import settings

    root = settings().log_dir.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - KEEP_DAYS * 86400
    for old in root.glob("*.log*"):          # logs of runs older than KEEP_DAYS are removed
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass
    return root / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{command}-{os.getpid()}.log"


def logging_config(path: Path, *, verbose: bool, quiet: bool, prefect: bool) -> dict:
    terminal_level = "DEBUG" if verbose else "WARNING" if quiet else "INFO"
    handlers = {
        "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "file", "level": "DEBUG",
                 "encoding": "utf-8"},
        "terminal": {"class": "lorasuite_core.io.terminal.TerminalHandler", "stream": "ext://sys.stderr",
                     "formatter": "file" if verbose else "terminal", "level": terminal_level,
                     "filters": ["noise"] if verbose else ["ours", "noise"]},
    }
    loggers = {"lorasuite_core": {"level": "DEBUG"}, "lorasuite": {"level": "DEBUG"}}   # the file gets DEBUG
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "s3fs", "fsspec", "aiosqlite", "asyncio"):
        loggers[noisy] = {"level": "DEBUG" if verbose else "WARNING"}
    if prefect:
        handlers["api"] = {"level": 0, "class": "prefect.logging.handlers.APILogHandler", "filters": ["redact"]}
        handlers["worker_api"] = {"level": 0, "class": "prefect.logging.handlers.WorkerAPILogHandler",
                                  "filters": ["redact"]}
        loggers.update({
            "prefect": {"level": "DEBUG" if verbose else "INFO"},
            "prefect.extra": {"level": "INFO", "handlers": ["api"], "propagate": False},
            "prefect.flow_runs": {"level": "NOTSET", "handlers": ["api"]},
            "prefect.task_runs": {"level": "NOTSET", "handlers": ["api"]},
            "prefect.workers": {"level": "NOTSET", "handlers": ["worker_api"]},
            "prefect._internal": {"level": "DEBUG" if verbose else "WARNING"},
            "prefect.server": {"level": "DEBUG" if verbose else "WARNING"},
            "uvicorn": {"level": "DEBUG" if verbose else "WARNING"},
            "fastapi": {"level": "DEBUG" if verbose else "WARNING"},
            "docket": {"level": "DEBUG" if verbose else "WARNING"},
        })
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"ours": {"()": f"{__name__}.OnlyLorasuite"}, "redact": {"()": f"{__name__}.RedactSecrets"},
                    "noise": {"()": f"{__name__}.DeprecationNoise"}},
        "formatters": {"file": {"()": f"{__name__}.RedactingFormatter", "format": FORMAT},
                       "terminal": {"()": f"{__name__}.TerminalFormatter", "format": "%(message)s"}},
        "handlers": handlers, "loggers": loggers,
        "root": {"level": "INFO", "handlers": ["file", "terminal"]},
    }


_INSTALLED: list[logging.Handler] = []
CURRENT: dict[str, Path] = {}


def configure(command: str, *, verbose: bool = False, quiet: bool = False) -> Path:
    """Install the file and terminal handlers in this process and hand the configuration to Prefect.

    The root logger's other handlers are left alone (a host such as pytest keeps its own); the
    handlers of an earlier call are replaced.  Returns the log file.
    """
    path = log_path(command)
    config = logging_config(path, verbose=verbose, quiet=quiet, prefect=False)
    root = logging.getLogger()
    for handler in _INSTALLED:
        root.removeHandler(handler)
        handler.close()
    _INSTALLED.clear()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(RedactingFormatter(FORMAT))
    terminal = TerminalHandler()
    terminal.setLevel(config["handlers"]["terminal"]["level"])
    terminal.setFormatter(RedactingFormatter(FORMAT) if verbose else TerminalFormatter("%(message)s"))
    if not verbose:
        terminal.addFilter(OnlyLorasuite())
    terminal.addFilter(DeprecationNoise())
    for handler in (file_handler, terminal):
        root.addHandler(handler)
        _INSTALLED.append(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # library warnings: the log file (DeprecationNoise keeps them off the terminal); off and on again, as a host
    # (pytest) may have put its own warnings.showwarning back since an earlier call
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for name, spec in config["loggers"].items():
        logging.getLogger(name).setLevel(spec["level"])
    CURRENT["log"] = path
    if "PREFECT_LOGGING_SETTINGS_PATH" not in os.environ:
        settings = path.with_suffix(".logging.json")
        settings.write_text(json.dumps(logging_config(path, verbose=verbose, quiet=quiet, prefect=True), indent=1))
        os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(settings)
    return path


def finish_terminal() -> None:
    """End of a command: the terminal's last stage lines, its progress bar removed (before a final line)."""
    for handler in _INSTALLED:
        if isinstance(handler, TerminalHandler):
            handler.finish()
