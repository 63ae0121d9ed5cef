"""Test-session settings.

Tiny models run faster on one intra-op thread (parallel overhead dominates), and a
single thread keeps timings sane when the machine is shared. Tests that run a real model
raise the count themselves. The CLI's log files go to a temporary directory.
"""
import atexit
import os
import shutil
import tempfile

import torch

torch.set_num_threads(int(os.environ.get("LORASUITE_TEST_TORCH_THREADS", "1")))

# The log files of the CLI runs the tests make (in process and in subprocesses) stay out of the user's
# ~/.cache/lorasuite/logs; a test about log files sets its own directory.
if "LORASUITE_LOG_DIR" not in os.environ:
    os.environ["LORASUITE_LOG_DIR"] = tempfile.mkdtemp(prefix="lorasuite-test-logs-")
    atexit.register(shutil.rmtree, os.environ["LORASUITE_LOG_DIR"], True)

from tests.prefect_server import prefect_server  # noqa: E402,F401  (session fixture)
