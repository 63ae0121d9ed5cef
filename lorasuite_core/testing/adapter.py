"""Random PEFT LoRA adapters for the ground-truth generator's models (non-zero A *and* B)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .model import family_of_config, randn

__all__ = ["make_random_lora_adapter", "zeroed_adapter", "DEFAULT_LORA_TARGETS"]

DEFAULT_LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def make_random_lora_adapter(model_dir, out_dir, *, rank: int = 4, alpha: int = 8, seed: int = 0, targets=None,
                             strength: float = 0.5) -> Path:
    """Write a PEFT LoRA adapter for the model in ``model_dir`` with random, non-zero A *and* B.

    Every adapted linear gets ``||(alpha/rank) B A||_F = strength * ||W||_F``; the default 0.5 changes
    the logits by about as much as their own magnitude (max |dlogit| ~ max |logit|).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    family = family_of_config(model.config)
    targets = list(targets) if targets is not None else list(DEFAULT_LORA_TARGETS[family])
    lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(int(seed) * 31337 + 11)
    scaling = alpha / rank
    n = 0
    with torch.no_grad():
        for name, module in sorted(peft_model.named_modules(), key=lambda x: x[0]):
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            A = module.lora_A["default"].weight
            B = module.lora_B["default"].weight
            W = module.get_base_layer().weight.to(torch.float64)
            a = randn(gen, *A.shape) / math.sqrt(A.shape[1])
            b = randn(gen, *B.shape) / math.sqrt(B.shape[1])
            delta = scaling * (b @ a)
            b = b * (strength * W.norm() / delta.norm())
            A.copy_(a.to(A.dtype))
            B.copy_(b.to(B.dtype))
            n += 1
    if n == 0:
        raise ValueError(f"no LoRA modules were created for targets {targets}")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def zeroed_adapter(adapter_dir, out_dir) -> Path:
    """A copy of the adapter in ``adapter_dir`` with every ``lora_B`` zero: the same config, A and shapes, and no
    effect on the model (an adapter no gate should pass)."""
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    return out_dir
