"""One settings object: every LORASUITE_* variable is read through lorasuite_core.settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from lorasuite_core.models import model_fetch
from lorasuite_core.pipeline import stage_store
from lorasuite_core.io import materialize
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.settings import settings


def test_defaults_and_variables_reach_every_reader(monkeypatch, tmp_path):
    for name in ("CACHE_ROOT", "DOWNLOAD_DIR", "CACHE_DIR", "MODELS_DIR", "CACHE", "LOG_DIR"):
        monkeypatch.delenv(f"LORASUITE_{name}", raising=False)
    home = Path.home() / ".cache" / "lorasuite"
    assert stage_store.configured_cache_root() == str(home / "pipeline")
    assert materialize.default_download_dir() == home / "materialized"
    assert model_fetch.default_cache_dir() == home / "models"
    monkeypatch.setenv("LORASUITE_CACHE_ROOT", "s3://bucket/cache")
    monkeypatch.setenv("LORASUITE_DOWNLOAD_DIR", str(tmp_path / "dl"))
    monkeypatch.setenv("LORASUITE_MODELS_DIR", str(tmp_path / "models"))
    assert stage_store.configured_cache_root() == "s3://bucket/cache"
    assert materialize.default_download_dir() == tmp_path / "dl"
    assert model_fetch.default_cache_dir() == tmp_path / "models"


@pytest.mark.parametrize("old, new, reader", [
    ("LORASUITE_CACHE_DIR", "LORASUITE_DOWNLOAD_DIR", materialize.default_download_dir),
    ("LORASUITE_CACHE", "LORASUITE_MODELS_DIR", model_fetch.default_cache_dir),
])
def test_old_variable_names_still_work(monkeypatch, tmp_path, old, new, reader):
    monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv(old, str(tmp_path / "old-name"))
    assert reader() == tmp_path / "old-name"


def test_invalid_value_is_one_line(monkeypatch):
    monkeypatch.setenv("LORASUITE_EMBEDDED_STARTUP_TIMEOUT", "soon")
    with pytest.raises(LorasuiteError, match="LORASUITE_EMBEDDED_STARTUP_TIMEOUT"):
        settings()
