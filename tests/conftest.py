"""Test-session settings.

Tiny models run faster on one intra-op thread (parallel overhead dominates), and a
single thread keeps timings sane when the machine is shared. Tests that run a real model
raise the count themselves.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("LORASUITE_TEST_TORCH_THREADS", "1")))

from tests.prefect_server import prefect_server  # noqa: E402,F401  (session fixture)
