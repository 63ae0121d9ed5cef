"""Every ``LORASUITE_*`` environment variable, in one pydantic-settings object.

``settings()`` reads the environment each time it is called (cheap), so a test or a worker that
changes a variable sees it at once.  Paths default under ``~/.cache/lorasuite/``:

==================================  ========================================  ==========================
variable                            meaning                                   default
==================================  ========================================  ==========================
``LORASUITE_CACHE_ROOT``            stage store (pair analysis, per-layer     ``~/.cache/lorasuite/
                                    results, adapters): path or ``s3://``     pipeline``
``LORASUITE_DOWNLOAD_DIR``          local copies of remote models, adapters   ``~/.cache/lorasuite/
                                    and stage entries (old name:              materialized``
                                    ``LORASUITE_CACHE_DIR``)
``LORASUITE_MODELS_DIR``            ``lorasuite models fetch`` (old name:     ``~/.cache/lorasuite/
                                    ``LORASUITE_CACHE``)                      models``
``LORASUITE_LOG_DIR``               the CLI's log files                       ``~/.cache/lorasuite/logs``
``LORASUITE_EMBEDDED_STARTUP_       seconds the CLI's private Prefect API     300
TIMEOUT``                           server may take to start
``LORASUITE_TASK_RUNNER``           ``threads`` / ``ray`` / ``ray:ADDRESS``   threads
``LORASUITE_MAX_PARALLEL_TASKS``    tasks at once in one flow run (threads)   cores / torch threads
``LORASUITE_FLEET_MANIFEST``        the nightly deployment's manifest         (none)
``LORASUITE_MEMORY_CHECK``          0: skip the pre-run check that whole-     1
                                    model stages fit in available memory
==================================  ========================================  ==========================
"""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_HOME = Path.home() / ".cache" / "lorasuite"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASUITE_", extra="ignore", populate_by_name=True)

    cache_root: str = str(_HOME / "pipeline")
    download_dir: Path = Field(_HOME / "materialized",
                               validation_alias=AliasChoices("LORASUITE_DOWNLOAD_DIR", "LORASUITE_CACHE_DIR"))
    models_dir: Path = Field(_HOME / "models", validation_alias=AliasChoices("LORASUITE_MODELS_DIR", "LORASUITE_CACHE"))
    log_dir: Path = _HOME / "logs"
    embedded_startup_timeout: float = Field(300.0, gt=0)
    task_runner: str = "threads"
    max_parallel_tasks: int | None = Field(None, ge=1)
    memory_check: bool = True
    fleet_manifest: str | None = None

    def cache_root_uri(self) -> str:
        root = self.cache_root.strip()
        return root if "://" in root else str(Path(root).expanduser())


def settings() -> Settings:
    """The current settings (environment read now); an invalid value raises a one-line LorasuiteError."""
    from pydantic import ValidationError

    from lorasuite_core.errors import LorasuiteError

    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(f"LORASUITE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in error.errors(include_url=False))
        raise LorasuiteError(f"invalid setting: {problems}") from None
