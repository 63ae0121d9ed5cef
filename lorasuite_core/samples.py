"""Where task samples come from on the command line and in fleet manifests.

A data spec is either a math_10k-layout JSON/JSONL file (local path or fsspec URI) or
``builtin:train`` / ``builtin:test`` for the deterministic arithmetic word problems (train
and test templates are disjoint). Errors become one-line ``LorasuiteError``s.
"""
from __future__ import annotations

from .errors import LorasuiteError

BUILTIN = "builtin:"


def load_samples(spec: str, limit: int | None = None, *, seed: int = 0, default_count: int = 500):
    from .task_data import generate_problems, load_math10k

    if spec.startswith(BUILTIN):
        split = spec[len(BUILTIN):]
        if split not in ("train", "test"):
            raise LorasuiteError(f"data {spec!r}: the built-in splits are builtin:train and builtin:test")
        return generate_problems(limit or default_count, split, seed)
    try:
        samples = load_math10k(spec, limit=limit)
    except (ValueError, FileNotFoundError) as exc:
        raise LorasuiteError(f"data {spec!r}: {exc}") from exc
    if not samples:
        raise LorasuiteError(f"data {spec!r} holds no samples")
    return samples
