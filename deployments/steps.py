"""The pull step of the shipped deployments: where a flow run works, and its stage store.

``deployments/prefect.yaml`` stores this step with its templates unresolved; the flow-run process
a worker starts resolves them (``{{ $VAR }}`` from its environment, ``{{ prefect.variables.x }}``
from the server: a missing variable is ``""``, a missing environment variable drops the argument)
and runs :func:`prepare_project` before it loads the flow's entrypoint.

* Working directory (the entrypoints ``flows/...`` are relative to it): ``$LORASUITE_PROJECT_DIR``
  (worker environment or job variable ``env``), else the Prefect Variable
  ``lorasuite_project_dir``, else the checkout this module was imported from (an editable
  install, ``make setup``, or the Docker image).  A directory without ``flows/migration.py`` is a
  one-line error naming what to set.
* Stage store: ``$LORASUITE_CACHE_ROOT`` when set (worker environment or job variable), else the
  Prefect Variable ``lorasuite_cache_root`` (one place for a workspace's shared ``s3://`` store),
  else the flows' default (``~/.cache/lorasuite/pipeline``).  Exported as ``LORASUITE_CACHE_ROOT``
  for the run.  Credentials are never taken from here: object-storage keys come from the worker's
  environment (``AWS_*``, instance roles); the store refuses a URI carrying credentials.

Imports nothing of ``flows``: the task runner is chosen when the flows are imported, after this step.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorasuite_core.errors import LorasuiteError

PROJECT_DIR_ENV = "LORASUITE_PROJECT_DIR"
PROJECT_DIR_VARIABLE = "lorasuite_project_dir"
CACHE_ROOT_ENV = "LORASUITE_CACHE_ROOT"
CACHE_ROOT_VARIABLE = "lorasuite_cache_root"
ENTRYPOINT_FILE = Path("flows") / "migration.py"



def default_project_dir() -> Path:
    """The checkout (or installed tree) that holds this package."""
    return Path(__file__).resolve().parents[1]


def project_dir(directory: str | None = None, variable_directory: str | None = None) -> Path:
    chosen = (directory or "").strip() or (variable_directory or "").strip()
    path = Path(chosen).expanduser() if chosen else default_project_dir()
    if not (path / ENTRYPOINT_FILE).is_file():
        where = f"${PROJECT_DIR_ENV} / Prefect Variable {PROJECT_DIR_VARIABLE}" if chosen else "the installed package"
        raise LorasuiteError(f"project directory {path} (from {where}) holds no {ENTRYPOINT_FILE}: set "
                             f"{PROJECT_DIR_ENV} on the worker to the lorasuite checkout")
    return path.resolve()


def prepare_project(directory: str | None = None, variable_directory: str | None = None,
                    cache_root: str | None = None) -> dict[str, str]:
    """Change into the project directory and export the cache root; returns both."""
    from prefect.deployments.steps import set_working_directory
    from prefect.logging import get_logger

    from lorasuite_core.io.uris import redact_uri

    path = project_dir(directory, variable_directory)
    set_working_directory(str(path))
    from lorasuite_core.settings import settings

    if "cache_root" not in settings().model_fields_set and (cache_root or "").strip():
        os.environ[CACHE_ROOT_ENV] = cache_root.strip()     # a URI with credentials is refused by the store
    current = settings()
    store = current.cache_root if "cache_root" in current.model_fields_set else ""
    get_logger("lorasuite.deployments").info("lorasuite project %s, stage store %s", path, redact_uri(store) if store else "(default)")
    return {"directory": str(path), "cache_root": store}
