"""A finished stage's freed memory leaves the process (lorasuite_core.io.memory).

The child process reproduces what a fleet does to glibc's allocator: a large tensor freed once raises the
dynamic mmap threshold, so the stage's later 4 MiB tensors come from the heap; small tensors allocated
between them (kept by the process, as a fleet keeps its results) keep the freed blocks from merging into
the heap's top, so glibc trims nothing when the stage frees them.  The child measures its RSS around the stage.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

CHILD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from lorasuite_core.io.memory import resident_bytes
from lorasuite_core.pipeline.stage_store import StageStore
import lorasuite_core.pipeline.stage_store as stage_store

if sys.argv[2] == "without":
    stage_store.release_if_grown = lambda before: False
MIB = 2 ** 20
kept, seen = [], {}

def compute(out: Path) -> dict:
    big = torch.ones(24 * MIB // 4)      # mmapped; freeing it raises the mmap threshold to 24 MiB
    del big
    blocks = []
    for _ in range(96):                  # 384 MiB from the heap, touched, each followed by a 256 KiB tensor
        blocks.append(torch.ones(4 * MIB // 4))                # the process keeps (as a fleet keeps results)
        kept.append(torch.ones(64 * 1024))
    seen["inside"] = resident_bytes()
    del blocks
    return {}

seen["start"] = resident_bytes()
StageStore.at(sys.argv[1]).run("demo", "k" * 64, compute)
seen["after"] = resident_bytes()
print(json.dumps(seen))
"""


def _child(tmp_path: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / mode), mode], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return {k: v / 2 ** 20 for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def test_a_computed_stage_returns_what_it_freed(tmp_path):
    without, with_release = _child(tmp_path, "without"), _child(tmp_path, "with")
    for run in (without, with_release):
        assert run["inside"] - run["start"] > 350, run           # the stage really held ~384 MiB
    assert without["after"] - without["start"] > 300, without    # the allocator keeps it: the failure mode
    assert with_release["after"] - with_release["start"] < 60, with_release


def test_a_stage_that_left_nothing_behind_is_not_followed_by_a_release(tmp_path, monkeypatch):
    """The release costs ~0.2 s with a model loaded: the per-layer stages (a fraction of a second each) skip it."""
    from lorasuite_core.io import memory
    from lorasuite_core.pipeline.stage_store import StageStore

    calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: calls.append(1) or True)
    StageStore.at(str(tmp_path / "store")).run("demo", "k" * 64, lambda out: {"answer": 1})
    assert calls == []
    assert memory.release_if_grown(memory.resident_bytes()) is False
    assert memory.release_if_grown(memory.resident_bytes() - memory.RELEASE_ABOVE_BYTES) is True and calls == [1]
