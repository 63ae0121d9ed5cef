"""The configurations of training and evaluation runs, with their defaults and help, declared once.

Plain dataclasses with no torch import, so the options schema (:mod:`lorasuite_core.pipeline.options`)
builds the ``lorasuite train`` / ``lorasuite eval`` flags from them (``metadata["help"]`` is a
flag's help, the field's default its default) and the numerics take them as parameters:

* :class:`TrainConfig` — one training run (:mod:`lorasuite_core.training.train`): optimiser, schedule,
  batches, devices, mixed precision.  :func:`default_lft_config` derives light fine-tuning's (no
  warmup; its learning rate comes from the migration options' ``lft_lr``).
* :class:`LoraShape` — the fresh adapter ``lorasuite train`` creates: rank, alpha, target modules.
* :class:`EvalConfig` — one evaluation (:func:`lorasuite_core.training.evaluation.evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

AUTOCAST_CHOICES = ("auto", "bf16", "off")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: vanilla LoRA as in LLM-Adapters, scaled down)."""

    lr: float = field(default=3e-4, metadata=_help("learning rate"))
    epochs: int = field(default=1, metadata=_help("passes over the training samples"))
    batch_size: int = field(default=4, metadata=_help("samples per micro-batch"))
    max_length: int = field(default=1024, metadata=_help("tokens per sample (prompt + answer); longer ones are cut "
                                                         "(a BFCL sample, its functions as JSON, reaches ~1000)"))
    warmup_ratio: float = field(default=0.0, metadata=_help("share of the steps with a linear warm-up"))
    seed: int = field(default=0, metadata=_help("seed of the adapter's initialisation and the shuffling"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    dtype: str = field(default="auto", metadata=_help("weights' dtype: auto (bf16 on bf16 CUDA, else float32), "
                                                      "float32, bfloat16, float16"))
    device: str = field(default="auto", metadata=_help("auto (CUDA when available), cpu, cuda, cuda:N"))
    lr_schedule: str = field(default="linear", metadata=_help("linear (decay to 0 after warm-up) or constant"))
    max_grad_norm: float | None = field(default=1.0, metadata=_help("gradient clipping norm"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    show_progress: bool = field(default=True, metadata=_help("a progress bar"))
    autocast: str = field(default="auto", metadata=_help("bf16 autocast of the forward passes: auto (where the "
                                                         "hardware has bf16 matrix units), bf16, off"))

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"TrainConfig.autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")


def default_lft_config(lr: float, **overrides: Any) -> TrainConfig:
    """The LFT config (LoRASuite): learning rate ``lr`` (its default is the options schema's ``lft_lr``),
    no warmup; ``overrides`` replace any other field."""
    return replace(TrainConfig(lr=lr, warmup_ratio=0.0), **overrides)


@dataclass(frozen=True)
class LoraShape:
    """The fresh LoRA adapter a training run creates."""

    rank: int = field(default=16, metadata=_help("LoRA rank"))
    alpha: float = field(default=32.0, metadata=_help("LoRA alpha (scaling alpha / rank)"))
    targets: str = field(default=",".join(DEFAULT_TARGETS), metadata=_help("comma-separated target modules"))

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]


LORA_SHAPE = LoraShape()


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: greedy generation in batches, scored exactly."""

    batch_size: int = field(default=64, metadata=_help("prompts generated side by side"))
    max_new_tokens: int | None = field(default=None, metadata=_help("tokens generated per prompt at most (default: "
                                                                    "each task's budget; arithmetic 64)"))
    dtype: str = field(default="auto", metadata=_help("auto (bf16 on CPUs with AVX512-BF16/AMX and bf16 GPUs, else "
                                                      "float32), float32, bfloat16"))
    device: str = field(default="auto", metadata=_help("auto (CUDA when available), cpu, cuda, cuda:N"))
