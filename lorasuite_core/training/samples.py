"""Where task samples come from: the command line, fleet manifests and pipeline stages.

A data reference is a math_10k-layout JSON/JSONL file (local path or any fsspec URI),
``builtin:train`` / ``builtin:test`` for the deterministic arithmetic word problems (train
and test templates are disjoint), ``task:NAME:SPLIT[:COUNT]`` for a registered skill
(:mod:`lorasuite_core.training.skills`), or None for the built-in problems of the given split.
Errors become one-line ``LorasuiteError``s with credentials redacted from URIs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from lorasuite_core.io.files import read_bytes
from lorasuite_core.io.uris import is_remote, redact_text, redact_uri, resolve
from lorasuite_core.errors import LorasuiteError

BUILTIN = "builtin:"


def load_samples(ref: str | None, limit: int | None = None, *, split: Literal["train", "test"] = "train",
                 seed: int = 0, default_count: int = 100) -> list:
    from lorasuite_core.training import skills
    from lorasuite_core.training.task_data import generate_problems, load_math10k

    if skills.is_task_spec(ref):
        try:
            return skills.load_task_samples(ref, limit, seed, default_count)  # type: ignore[arg-type]
        except ValueError as exc:
            raise LorasuiteError(str(exc)) from None
    if ref is None or ref.startswith(BUILTIN):
        split = ref[len(BUILTIN):] if ref else split
        if split not in ("train", "test"):
            raise LorasuiteError(f"data {ref!r}: the built-in splits are builtin:train and builtin:test")
        return generate_problems(limit or default_count, split, seed)
    safe = redact_uri(ref)
    try:
        if not is_remote(ref):
            samples = load_math10k(resolve(ref)[1], limit=limit)
        else:
            suffix = ".jsonl" if ref.lower().endswith(".jsonl") else ".json"
            with tempfile.TemporaryDirectory(prefix="lorasuite-data-") as tmp:
                local = Path(tmp) / f"data{suffix}"
                local.write_bytes(read_bytes(ref))
                samples = load_math10k(local, limit=limit)
    except FileNotFoundError:
        raise LorasuiteError(f"data file {safe} does not exist") from None
    except ValueError as exc:
        raise LorasuiteError(f"data file {safe}: {redact_text(str(exc))}") from None
    if not samples:
        raise LorasuiteError(f"data file {safe} holds no samples")
    return samples
