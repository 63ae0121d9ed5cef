"""Devices, dtypes and memory high-water marks for training and evaluation.

* ``device="auto"``: CUDA when available, else the CPU.  ``dtype="auto"`` (the weights): bfloat16 on
  bf16-capable CUDA, float32 otherwise.
* Mixed precision (:func:`autocast_dtype`): with float32 weights, ``autocast="auto"`` multiplies in bf16
  where the hardware does so natively -- CPUs with AVX512-BF16 or AMX (:func:`cpu_supports_bf16`),
  bf16-capable CUDA -- and in fp32 elsewhere; ``"bf16"`` forces it, ``"off"`` keeps fp32.
  :func:`training_compute_dtype` names the result for stage keys.
* Memory: the process's peak RSS (the OS high-water mark, ``resource``) and, on CUDA,
  ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on bf16-capable CUDA, else float32; or an explicit name (float32/bf16/fp16)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def cpu_supports_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 matmuls beat fp32."""
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes if callable(probe))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_has_bf16(device: torch.device) -> bool:
    """bf16 matrix products in hardware: AVX512-BF16/AMX CPUs, bf16-capable CUDA."""
    if device.type == "cpu":
        return cpu_supports_bf16()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_dtype(autocast: str, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of a training step (None: plain fp32/weights' dtype); see the module docstring."""
    if autocast == "off" or weights != torch.float32:
        return None
    if autocast == "bf16" or device_has_bf16(device):
        return torch.bfloat16
    return None


def training_compute_dtype(autocast: str = "auto", device: str = "auto", dtype: str = "auto") -> str:
    """What a training run with these settings multiplies in, by name: part of the LFT/baseline stage keys."""
    resolved = resolve_device(device)
    weights = resolve_dtype(dtype, resolved)
    mixed = autocast_dtype(autocast, resolved, weights)
    return str(mixed or weights).replace("torch.", "")


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (OS high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
