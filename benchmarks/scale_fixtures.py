"""Fixtures of the scale benchmark (``scale_benchmark.py``): random LoRA adapters and the synthetic 7B -> 8B-shaped
llama checkpoints, written shard by shard so that no whole 7B model is ever held in memory."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32

OLD_7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128, intermediate_size=11008)
NEW_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336)
SYNTH_VOCAB = 8192   # > d = 4096: the transfer matrix needs at least d shared tokens


def make_adapter(model_dir: Path, out: Path) -> Path:
    from lorasuite_core.testing.adapter import make_random_lora_adapter

    if not (out / "adapter_model.safetensors").is_file():
        t = time.perf_counter()
        make_random_lora_adapter(model_dir, out, rank=RANK, alpha=ALPHA, seed=0, targets=TARGETS)
        print(f"adapter written to {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def make_adapter_streamed(model_dir: Path, out: Path, *, seed: int = 0, strength: float = 0.5) -> Path:
    """A random LoRA like ``testing.adapter.make_random_lora_adapter`` (random A and B on every target, scaled so
    that ‖(alpha/rank)·B·A‖_F = strength·‖W‖_F) written weight by weight from the safetensors shards: a 7B-shaped
    model is never loaded whole (in float32 it is 26 GB).  ‖B·A‖_F² = tr((BᵀB)(AAᵀ)): no dense product."""
    import torch
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    t = time.perf_counter()
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    gen = torch.Generator().manual_seed(seed * 31337 + 11)
    tensors = {}
    for name in sorted(weight_map):
        parts = name.split(".")
        if parts[-1] != "weight" or parts[-2] not in TARGETS:
            continue
        with safe_open(model_dir / weight_map[name], framework="pt") as handle:
            weight = handle.get_tensor(name)
        rows, cols = weight.shape
        w_norm = weight.to(torch.float64).norm()
        a = torch.randn(RANK, cols, generator=gen, dtype=torch.float64) / cols ** 0.5
        b = torch.randn(rows, RANK, generator=gen, dtype=torch.float64) / RANK ** 0.5
        delta_norm = (ALPHA / RANK) * torch.trace((b.T @ b) @ (a @ a.T)).sqrt()
        b = b * (strength * w_norm / delta_norm)
        prefix = "base_model.model." + name[: -len(".weight")]
        tensors[prefix + ".lora_A.weight"] = a.float().contiguous()
        tensors[prefix + ".lora_B.weight"] = b.float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=str(model_dir)).save_pretrained(str(out))
    print(f"adapter ({len(tensors) // 2} modules) written to {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def write_synthetic_model(out: Path, shape: dict, layers: int, seed: int, dtype: str = "float32") -> Path:
    """A llama checkpoint of ``shape`` with ``layers`` random layers, one safetensors shard per layer,
    stored in ``dtype`` (``bfloat16``: as real releases are, half the disk; drawn in float32 and rounded).

    Layer ``i``'s shard depends only on (``seed``, ``i``): it is written once into ``out.parent /
    pool-SEED`` and hard-linked into every depth's checkpoint, so the 2-, 4- and 8-layer models share
    their first layers (and the disk space).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lorasuite_core.testing.tokenizer import make_tokenizer

    if (out / "model.safetensors.index.json").is_file():
        return out
    pool = out.parent.parent / (f"pool-{seed}" if dtype == "float32" else f"pool-{seed}-{dtype}")
    pool.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer("byte_bpe", out)
    tok.add_tokens([f"<|reserved_{i}|>" for i in range(SYNTH_VOCAB - len(tok))])
    tok.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, dtype=dtype, **shape)
    config.save_pretrained(out)
    d, hd, h, kv, f = (shape[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size"))

    def shard_file(name: str, part: int, tensors) -> Path:
        path = pool / name
        if not path.is_file():
            g = torch.Generator().manual_seed(seed * 1000 + part)
            stored = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors(g).items()}
            save_file(stored, str(path.with_suffix(".tmp")), metadata={"format": "pt"})
            path.with_suffix(".tmp").rename(path)
        return path

    def lin(g, rows, cols):
        return torch.randn(rows, cols, generator=g) / cols ** 0.5

    def gain(g, n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    def layer_tensors(i):
        p = f"model.layers.{i}."
        return lambda g: {p + "input_layernorm.weight": gain(g, d), p + "post_attention_layernorm.weight": gain(g, d),
                          p + "self_attn.q_proj.weight": lin(g, h * hd, d),
                          p + "self_attn.k_proj.weight": lin(g, kv * hd, d),
                          p + "self_attn.v_proj.weight": lin(g, kv * hd, d),
                          p + "self_attn.o_proj.weight": lin(g, d, h * hd),
                          p + "mlp.gate_proj.weight": lin(g, f, d), p + "mlp.up_proj.weight": lin(g, f, d),
                          p + "mlp.down_proj.weight": lin(g, d, f)}

    def global_tensors(g):
        return {"model.embed_tokens.weight": torch.randn(SYNTH_VOCAB, d, generator=g),
                "model.norm.weight": gain(g, d), "lm_head.weight": lin(g, SYNTH_VOCAB, d)}

    weight_map = {}
    shards = [(f"layer-{i:03d}.safetensors", i, layer_tensors(i)) for i in range(layers)]
    shards.append((f"globals-v{SYNTH_VOCAB}.safetensors", 999, global_tensors))
    for name, part, tensors in shards:
        source = shard_file(name, part, tensors)
        (out / f"model-{name}").unlink(missing_ok=True)
        os.link(source, out / f"model-{name}")
        from safetensors import safe_open

        with safe_open(source, framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), f"model-{name}"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out
