"""The pre-run check's memory part: refuse, before any analysis, a migration whose whole-model stages cannot fit.

The transfer streams the weights layer by layer, but some stages load a whole model (``graph.Stage.torch_model``),
on a CPU in float32 (``training.devices.resolve_dtype``'s "auto"), whatever dtype the checkpoint is stored in:

* the teacher's answers, fidelity, evaluation and the quality gate hold one model at a time;
* light fine-tuning holds the new model; distillation (``--lft-mode distill``, the distilling routes, and ``auto``
  where the LFT distils) holds the student (new model) and its teacher (old model) at once;
* ``auto`` scores its candidates (the teacher's answers, then each candidate on the new model) one model at a time.

A model's weights take ``P x 4`` bytes, ``P`` its parameter count read from the safetensors headers (each tensor's
shape; no weight is read).  The need is the largest of those stages' holdings plus :data:`OVERHEAD` (the
interpreter, torch, tokenizers, activations).  Where it exceeds the memory the kernel reports available
(``MemAvailable`` in ``/proc/meminfo``), the migration is refused with the flags that drop those stages, instead of
being killed by the kernel an hour later (a 32-layer 7B -> 8B pair on a 24 GiB machine: the pair analysis and the
transfer ran 65 minutes within 7.6 GB, then the teacher answers for fidelity loaded the old model whole in float32,
26 GB, and the kernel killed the process at 20.8 GB; ``benchmarks/SCALE.md``).

The need is a floor, not a guarantee: activations, optimizer state and the allocator come on top (a distillation
into Qwen2.5-Coder-1.5B from the 0.5B holds 8.2 GB of weights and peaked at 16.3 GB; ``benchmarks/
FLEET_ECONOMICS.md``), so a run that passes can still need more; a run that fails it cannot fit.

Not checked: models that are not local directories (hub ids, object storage: their size is known only after the
download), runs with a CUDA device (the weights go to the GPU), and ``LORASUITE_MEMORY_CHECK=0``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import DISTILL_ROUTES, MigrationOptions

#: Bytes beside the weights: the interpreter, torch and tokenizers (~1 GB measured), activations, KV caches.
OVERHEAD = 2 * 10**9
#: Bytes per parameter of a whole-model load on a CPU (float32).
CPU_BYTES = 4


def parameter_count(model_dir: str) -> int | None:
    """Parameters of the safetensors checkpoint in ``model_dir`` (from the headers), or None when it is not a local
    one or a header does not parse."""
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    count = 1
                    for size in entry["shape"]:
                        count *= int(size)
                    total += count
    except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error):
        return None                   # unreadable: the stage that reads it says what is wrong, with its name
    return total


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def whole_model_stages(options: MigrationOptions) -> list[tuple[str, str, bool]]:
    """(what, the flag that drops it, whether it holds both models at once) for the options' whole-model stages."""
    o, found = options, []
    if o.fidelity:
        found.append(("fidelity", "--no-fidelity", False))
    # auto distils only where the LFT does (routes.candidate_stages); it scores its candidates one model at a time
    distils = o.route in DISTILL_ROUTES or (o.runs_lft and o.lft_mode == "distill")
    if o.route == "auto":
        found.append(("scoring the routes", "--route transfer", False))
    if distils:
        found.append(("distillation (student and teacher at once)", "--no-lft / --route transfer", True))
    elif o.runs_lft:
        found.append(("light fine-tuning", "--no-lft", False))
    if o.eval_data:
        found.append(("evaluation", "no --eval-data", False))
    if o.gate:
        found.append(("the quality gate", "--no-gate", False))
    return found


def check_memory(old_model: str, new_model: str, options: MigrationOptions, *, available: int | None = None) -> None:
    """Raise :class:`LorasuiteError` when the whole-model stages of ``options`` need more memory than is available."""
    from lorasuite_core.settings import settings

    if not settings().memory_check:
        return
    stages = whole_model_stages(options)
    counts = {"old": parameter_count(old_model), "new": parameter_count(new_model)}
    if not stages or None in counts.values() or _cuda():
        return
    old, new = (counts[k] * CPU_BYTES for k in ("old", "new"))
    available = available_bytes() if available is None else available
    need = max((old + new) if both else max(old, new) for _, _, both in stages) + OVERHEAD
    if available is None or need <= available:
        return
    heavy = [(what, flag) for what, flag, both in stages if ((old + new) if both else max(old, new)) + OVERHEAD > available]
    raise LorasuiteError(
        f"{', '.join(what for what, _ in heavy)} load{'s' if len(heavy) == 1 else ''} whole models in float32 "
        f"(old {old / 1e9:.1f} GB, new {new / 1e9:.1f} GB; {need / 1e9:.1f} GB with overhead) and this machine has "
        f"{available / 1e9:.1f} GB available; drop {'them' if len(heavy) > 1 else 'it'} "
        f"({'; '.join(flag for _, flag in heavy)}): the transfer alone streams the weights layer by layer "
        f"(LORASUITE_MEMORY_CHECK=0 skips this check)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
