"""Give the memory a finished stage freed back to the operating system.

Why
---
glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and
unmaps it on ``free``; smaller requests come from the heap arenas, whose freed pages stay resident
until the top of an arena is trimmed.  The threshold is dynamic: freeing an mmapped block larger than
the current threshold raises the threshold to that block's size (up to 32 MiB on 64-bit).  So once a
model's tensors have been freed, later weight- and activation-sized tensors (a few MiB to 32 MiB) come
from the heap, and when a stage frees its models those pages stay in the process's RSS.  A fleet runs
many stages in one process: an in-process fleet of three distillations on the same-shape SmolLM2 pair
(``benchmarks/fleet_memory.py``) kept 2.24–2.29 GB resident after its LFT stages, against 0.81 GB after
the teacher stage; with :func:`release_freed_memory` after every stage, 0.93–1.19 GB.  Its peak (during a
distillation) moved little, 3.47 → 3.38 GB: what a stage needs while it runs is not retention
(benchmarks/FLEET_ECONOMICS.md).

What
----
:func:`release_freed_memory`: a garbage collection (models held in reference cycles are freed now, not at
some later collection), then ``malloc_trim(0)``, which hands every whole free page of every arena back to
the kernel (``madvise(MADV_DONTNEED)``; glibc ≥ 2.8).  It changes no result.  Where the C library is not
glibc (musl, macOS) only the collection runs.

When
----
:func:`release_if_grown` after every computed stage (``StageStore.run``, the one place both the in-process
runner and the Prefect tasks go through), but only when the stage left the process at least
:data:`RELEASE_ABOVE_BYTES` larger than it found it.  The release costs about 0.2 s with a model's Python
objects alive (the collection walks them all; measured with Qwen2.5-Coder-0.5B loaded), which the per-layer
transfer stages, a fraction of a second each, cannot afford: releasing after each of them took the marginal
adapter's transfer from 4.6–5.5 s to 20–35 s on the Qwen pair (benchmarks/FLEET_ECONOMICS.md).  Stages that
load models (the teacher, LFT, fidelity, the activations) leave gigabytes behind and are released.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()


#: A stage that leaves the process this much larger than it found it is followed by a release.
RELEASE_ABOVE_BYTES = 256 * 2**20


def release_if_grown(before: int | None) -> bool:
    """Release (:func:`release_freed_memory`) when RSS now exceeds ``before`` (RSS when the stage started) by at
    least :data:`RELEASE_ABOVE_BYTES`; True if it released."""
    now = resident_bytes()
    if before is None or now is None or now - before < RELEASE_ABOVE_BYTES:
        return False
    return release_freed_memory()


def release_freed_memory() -> bool:
    """Collect garbage and return the allocator's free pages to the kernel; True if ``malloc_trim`` ran."""
    before = resident_bytes()
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    after = resident_bytes()
    if before is not None and after is not None:
        log.debug("released %.2f GB of freed memory (RSS %.2f GB)", (before - after) / 1e9, after / 1e9)
    return True
