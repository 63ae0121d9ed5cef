"""One Prefect test server per pytest session (starting one costs 10-40 s).

Every flow run of the session — the CLI's ``lorasuite migrate`` included — reports to it.
The pipeline's cache and downloads go under a session temporary directory, so no test
reuses another run's analysis by accident.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("prefect-session")
    patch = pytest.MonkeyPatch()
    patch.setenv("LORASUITE_DOWNLOAD_DIR", str(root / "materialized"))
    patch.setenv("LORASUITE_CACHE_ROOT", str(root / "pipeline"))
    patch.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
    patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        with prefect_test_harness(server_startup_timeout=240):
            yield root
    finally:
        from lorasuite_core.pipeline import pair_stages

        pair_stages.clear_memo()
        patch.undo()
