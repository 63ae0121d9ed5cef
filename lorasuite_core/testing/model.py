"""Tiny random Hugging Face causal LMs of five families, and their canonical float64 representation.

``make_tiny_model_dir`` writes a tiny random model (``llama``, ``qwen2``, ``gemma3`` -- the text-only
``gemma3_text`` model --, ``gpt_neox`` and ``bloom``) with its tokenizer.  The upgrade
(``lorasuite_core.testing.upgrade``) reads a model into the canonical representation (``from_hf``),
transforms it and writes it back (``to_hf``, ``save_model``); the norm formulas are in
``lorasuite_core.testing.upgrade_steps``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

from .tokenizer import make_tokenizer

__all__ = ["FAMILIES", "make_tiny_model_dir"]

FAMILIES = ("llama", "qwen2", "gemma3", "gpt_neox", "bloom")

_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text", "gpt_neox": "gpt_neox", "bloom": "bloom"}
_FAMILY_OF_MODEL_TYPE = {v: k for k, v in _MODEL_TYPE.items()}
_TOKENIZER_STYLE = {"llama": "byte_bpe", "qwen2": "byte_bpe", "gemma3": "metaspace", "gpt_neox": "byte_bpe",
                    "bloom": "byte_bpe"}
FUSED_QKV = ("gpt_neox", "bloom")       # one query_key_value, rows [head][q|k|v][head_dim]
_LAYER_NORM = ("gpt_neox", "bloom")      # LayerNorm with bias (everything else: RMSNorm)

# ----------------------------------------------------------------------------------------------
# Canonical (family independent) float64 representation
# ----------------------------------------------------------------------------------------------
#
# canon = {
#   "family": str, "dims": {hidden, heads, kv_heads, head_dim, inter, vocab},
#   "embed": [V, d], "lm_head": {"w": [V, d], "b": None}, "tied": bool,
#   "final_norm": norm, "embed_norm": norm|None (bloom's word_embeddings_layernorm), "layers": [layer, ...]
# }
# norm  = {"w": effective weight g (gemma3: 1 + w), "b": LayerNorm bias or None, "folded": bool}
# layer = {"attn_norm": norm, "mlp_norm": norm, "post_attn_norm": norm|None, "post_ff_norm": norm|None,
#          "q_norm": norm|None, "k_norm": norm|None,
#          "q"/"k"/"v"/"o"/"up"/"down": {"w", "b"|None}, "gate": {"w", "b"}|None}
# gpt_neox's and bloom's fused query_key_value is split into q/k/v (and re-fused on save).

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
_PRE_NORMS = ("attn_norm", "mlp_norm")
POST_NORMS = ("post_attn_norm", "post_ff_norm")


def gemma_like(family: str) -> bool:
    return family == "gemma3"


def _layer_names(family: str, i: int) -> dict[str, str]:
    if family == "bloom":
        p = f"transformer.h.{i}."
        return {
            "attn_norm": p + "input_layernorm",
            "mlp_norm": p + "post_attention_layernorm",
            "qkv": p + "self_attention.query_key_value",
            "o": p + "self_attention.dense",
            "up": p + "mlp.dense_h_to_4h",
            "down": p + "mlp.dense_4h_to_h",
        }
    if family == "gpt_neox":
        p = f"gpt_neox.layers.{i}."
        return {
            "attn_norm": p + "input_layernorm",
            "mlp_norm": p + "post_attention_layernorm",
            "qkv": p + "attention.query_key_value",
            "o": p + "attention.dense",
            "up": p + "mlp.dense_h_to_4h",
            "down": p + "mlp.dense_4h_to_h",
        }
    p = f"model.layers.{i}."
    names = {
        "attn_norm": p + "input_layernorm",
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj",
        "gate": p + "mlp.gate_proj",
        "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj",
    }
    if family == "gemma3":
        names.update(
            post_attn_norm=p + "post_attention_layernorm",
            mlp_norm=p + "pre_feedforward_layernorm",
            post_ff_norm=p + "post_feedforward_layernorm",
            q_norm=p + "self_attn.q_norm",
            k_norm=p + "self_attn.k_norm",
        )
    else:
        names["mlp_norm"] = p + "post_attention_layernorm"
    return names


def _global_names(family: str) -> dict[str, str]:
    if family == "bloom":
        return {"embed": "transformer.word_embeddings", "embed_norm": "transformer.word_embeddings_layernorm",
                "final_norm": "transformer.ln_f", "lm_head": "lm_head"}
    if family == "gpt_neox":
        return {"embed": "gpt_neox.embed_in", "final_norm": "gpt_neox.final_layer_norm", "lm_head": "lm_head"}
    return {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}


def family_of_config(cfg) -> str:
    mt = getattr(cfg, "model_type", None)
    if mt not in _FAMILY_OF_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {sorted(_FAMILY_OF_MODEL_TYPE)}")
    return _FAMILY_OF_MODEL_TYPE[mt]


def dims_of_config(family: str, cfg) -> dict[str, int]:
    heads = cfg.num_attention_heads
    inter = 4 * cfg.hidden_size if family == "bloom" else cfg.intermediate_size  # BloomMLP: fixed 4 x hidden
    if family in FUSED_QKV:
        kv, hd = heads, cfg.hidden_size // heads
    else:
        kv = cfg.num_key_value_heads or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "hidden": cfg.hidden_size,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": hd,
        "inter": inter,
        "vocab": cfg.vocab_size,
        "layers": cfg.num_hidden_layers,
    }


def from_hf(family: str, cfg, sd: dict[str, torch.Tensor]) -> dict:
    """HF state dict (any float dtype) -> canonical float64 representation."""
    used: set[str] = set()
    f64 = torch.float64

    def take(name: str, required: bool = True):
        if name not in sd:
            if required:
                raise ValueError(f"missing tensor {name!r} in state dict")
            return None
        used.add(name)
        return sd[name].detach().to(f64).clone()

    gemma = gemma_like(family)

    def norm(prefix: str):
        w = take(prefix + ".weight")
        b = take(prefix + ".bias", required=False)
        if gemma:
            w = 1.0 + w
        return {"w": w, "b": b, "folded": False}

    def lin(prefix: str):
        return {"w": take(prefix + ".weight"), "b": take(prefix + ".bias", required=False)}

    dims = dims_of_config(family, cfg)
    g = _global_names(family)
    canon: dict[str, Any] = {"family": family, "dims": dims}
    canon["embed"] = take(g["embed"] + ".weight")
    canon["final_norm"] = norm(g["final_norm"])
    canon["embed_norm"] = norm(g["embed_norm"]) if "embed_norm" in g else None
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lm = take(g["lm_head"] + ".weight", required=not tied)
    if lm is None or tied:
        lm = canon["embed"].clone()
    canon["lm_head"] = {"w": lm, "b": None}
    canon["tied"] = tied
    layers = []
    H, KV, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    for i in range(dims["layers"]):
        n = _layer_names(family, i)
        L: dict[str, Any] = {k: None for k in LINEARS + _PRE_NORMS + POST_NORMS + ("q_norm", "k_norm")}
        L["attn_norm"] = norm(n["attn_norm"])
        L["mlp_norm"] = norm(n["mlp_norm"])
        if family in FUSED_QKV:
            qkv = lin(n["qkv"])
            w = qkv["w"].view(H, 3, hd, -1)
            b = qkv["b"].view(H, 3, hd) if qkv["b"] is not None else None
            for j, key in enumerate("qkv"):
                L[key] = {
                    "w": w[:, j].reshape(H * hd, -1).clone(),
                    "b": b[:, j].reshape(H * hd).clone() if b is not None else None,
                }
        else:
            for key in ("q", "k", "v", "gate"):
                L[key] = lin(n[key])
        for key in ("o", "up", "down"):
            L[key] = lin(n[key])
        if gemma:
            L["post_attn_norm"] = norm(n["post_attn_norm"])
            L["post_ff_norm"] = norm(n["post_ff_norm"])
            L["q_norm"] = norm(n["q_norm"])
            L["k_norm"] = norm(n["k_norm"])
        layers.append(L)
    canon["layers"] = layers
    unused = sorted(set(sd) - used - {g["lm_head"] + ".weight"})
    if unused:
        raise ValueError(f"unexpected tensors in the {family} state dict (not understood): {unused[:8]}")
    return canon


def to_hf(canon: dict) -> dict[str, torch.Tensor]:
    """Canonical representation -> HF float32 state dict (lm_head always included)."""
    family = canon["family"]
    gemma = gemma_like(family)
    f32 = torch.float32
    sd: dict[str, torch.Tensor] = {}

    def put_norm(prefix: str, nm: dict):
        w = nm["w"] - 1.0 if gemma else nm["w"]
        sd[prefix + ".weight"] = w.to(f32).contiguous()
        if nm["b"] is not None:
            sd[prefix + ".bias"] = nm["b"].to(f32).contiguous()

    def put_lin(prefix: str, ln: dict):
        sd[prefix + ".weight"] = ln["w"].to(f32).contiguous()
        if ln["b"] is not None:
            sd[prefix + ".bias"] = ln["b"].to(f32).contiguous()

    g = _global_names(family)
    sd[g["embed"] + ".weight"] = canon["embed"].to(f32).contiguous()
    put_norm(g["final_norm"], canon["final_norm"])
    if canon.get("embed_norm") is not None:
        put_norm(g["embed_norm"], canon["embed_norm"])
    sd[g["lm_head"] + ".weight"] = canon["lm_head"]["w"].to(f32).contiguous()
    hd = canon["dims"]["head_dim"]
    for i, L in enumerate(canon["layers"]):
        n = _layer_names(family, i)
        put_norm(n["attn_norm"], L["attn_norm"])
        put_norm(n["mlp_norm"], L["mlp_norm"])
        if family in FUSED_QKV:
            H = L["q"]["w"].shape[0] // hd
            w = torch.stack([L[k]["w"].view(H, hd, -1) for k in "qkv"], dim=1).reshape(3 * H * hd, -1)
            qkv = {"w": w, "b": None}
            if L["q"]["b"] is not None:
                qkv["b"] = torch.stack([L[k]["b"].view(H, hd) for k in "qkv"], dim=1).reshape(3 * H * hd)
            put_lin(n["qkv"], qkv)
        else:
            for key in ("q", "k", "v", "gate"):
                put_lin(n[key], L[key])
        for key in ("o", "up", "down"):
            put_lin(n[key], L[key])
        if gemma:
            for key in ("post_attn_norm", "post_ff_norm", "q_norm", "k_norm"):
                put_norm(n[key], L[key])
    return sd


# ----------------------------------------------------------------------------------------------
# Random tiny models
# ----------------------------------------------------------------------------------------------


def randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def random_norm_weight(gen: torch.Generator, n: int) -> torch.Tensor:
    """Effective norm weight, 1 + 0.3 N(0,1), kept in [0.4, 1.6] (non-trivial and safely non-zero)."""
    return (1.0 + 0.3 * randn(gen, n)).clamp(0.4, 1.6)


def _random_canon(family: str, dims: dict, cfg, gen: torch.Generator) -> dict:
    d, H, KV, hd, inter, V = (dims[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab"))
    gemma = gemma_like(family)
    neox = family in FUSED_QKV                       # no gate, biased MLP
    layer_norm = family in _LAYER_NORM
    attn_bias = bool(getattr(cfg, "attention_bias", False)) or family in ("qwen2", "bloom")
    mlp_bias = bool(getattr(cfg, "mlp_bias", False)) or neox

    def norm(n):
        return {"w": random_norm_weight(gen, n), "b": 0.2 * randn(gen, n) if layer_norm else None, "folded": False}

    def lin(out, inp, bias, bias_scale=0.1):
        return {"w": randn(gen, out, inp) / math.sqrt(inp), "b": bias_scale * randn(gen, out) if bias else None}

    canon: dict[str, Any] = {"family": family, "dims": dict(dims)}
    # Residual components O(1): gemma3 multiplies the embedding by sqrt(d).
    canon["embed"] = randn(gen, V, d) / (math.sqrt(d) if gemma else 1.0)
    canon["final_norm"] = norm(d)
    canon["embed_norm"] = norm(d) if family == "bloom" else None
    canon["tied"] = bool(getattr(cfg, "tie_word_embeddings", False))
    canon["lm_head"] = {"w": canon["embed"].clone() if canon["tied"] else 3.0 * randn(gen, V, d) / math.sqrt(d), "b": None}
    layers = []
    for _ in range(dims["layers"]):
        L: dict[str, Any] = {k: None for k in LINEARS + _PRE_NORMS + POST_NORMS + ("q_norm", "k_norm")}
        L["attn_norm"] = norm(d)
        L["mlp_norm"] = norm(d)
        qkv_bias_scale = 0.3 if family == "qwen2" else 0.1
        L["q"] = lin(H * hd, d, attn_bias, qkv_bias_scale)
        L["k"] = lin(KV * hd, d, attn_bias, qkv_bias_scale)
        L["v"] = lin(KV * hd, d, attn_bias, qkv_bias_scale)
        L["o"] = lin(d, H * hd, attn_bias and family != "qwen2")
        if not neox:
            L["gate"] = lin(inter, d, mlp_bias)
        L["up"] = lin(inter, d, mlp_bias)
        L["down"] = lin(d, inter, mlp_bias)
        if gemma:
            L["post_attn_norm"] = norm(d)
            L["post_ff_norm"] = norm(d)
            L["q_norm"] = norm(hd)
            L["k_norm"] = norm(hd)
        layers.append(L)
    canon["layers"] = layers
    return canon


def _build_config(family: str, vocab_size: int, special_ids: dict, overrides: dict):
    ov = dict(overrides)
    hidden = ov.get("hidden_size", 64)
    heads = ov.get("num_attention_heads", 4)
    layers = ov.get("num_hidden_layers", 3)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )
    if family == "bloom":
        kw = dict(common, layer_norm_epsilon=1e-5)
        kw.pop("intermediate_size")  # BloomMLP is 4 x hidden_size wide
        kw.pop("max_position_embeddings")  # ALiBi: no position table
        kw.update(ov)
        return BloomConfig(**kw)
    if family == "gpt_neox":
        kw = dict(common, rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
                  hidden_act="gelu")
        kw.update(ov)
        return GPTNeoXConfig(**kw)
    kw = dict(common, num_key_value_heads=max(1, heads // 2), head_dim=ov.get("head_dim", hidden // heads),
              rms_norm_eps=1e-6)
    if family == "llama":
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(ov)
        return LlamaConfig(**kw)
    if family == "qwen2":
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(ov)
        return Qwen2Config(**kw)
    if family == "gemma3":
        kw.update(
            sliding_window=4,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
        kw.update(ov)
        if "layer_types" not in ov:
            n = kw["num_hidden_layers"]
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return Gemma3TextConfig(**kw)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def save_model(canon: dict, config, out_dir: Path) -> None:
    model = AutoModelForCausalLM.from_config(config)
    sd = to_hf(canon)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (canon["tied"] and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"internal error: state dict mismatch, missing={missing[:8]} unexpected={unexpected[:8]}")
    model = model.to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def make_tiny_model_dir(family: str, out_dir, *, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random HF causal LM (config.json, model.safetensors, tokenizer) into ``out_dir``.

    Defaults: hidden 64, 4 query heads, 2 kv heads (gpt_neox, bloom: 4 heads MHA), head_dim 16,
    intermediate 128 (bloom: 4 * hidden = 256), 3 layers, untied ``lm_head``, vocab = tokenizer size.  qwen2 has random q/k/v
    biases; gemma3 (``gemma3_text``) alternates sliding (window 4) and full attention layers;
    gpt_neox uses ``rotary_pct`` 0.5 and a parallel residual; bloom has biases on every linear and a
    LayerNorm on the embeddings.  All norm weights (and LayerNorm biases)
    are random, non-trivial.  ``config_overrides`` go to the config class (e.g. ``hidden_size``,
    ``num_hidden_layers``, ``tie_word_embeddings``, ``vocab_size`` >= tokenizer size: the tokenizer
    is then padded with ``<|reserved_i|>`` tokens).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(_TOKENIZER_STYLE[family], out_dir)
    want_vocab = config_overrides.pop("vocab_size", None)
    if want_vocab is not None:
        if want_vocab < len(tok):
            raise ValueError(f"vocab_size={want_vocab} is smaller than the tokenizer ({len(tok)} tokens)")
        if want_vocab > len(tok):
            tok.add_tokens([f"<|reserved_{i}|>" for i in range(want_vocab - len(tok))])
            tok.save_pretrained(out_dir)
    special_ids = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
    }
    config = _build_config(family, len(tok), special_ids, config_overrides)
    gen = torch.Generator().manual_seed(int(seed) * 1000003 + FAMILIES.index(family))
    dims = dims_of_config(family, config)
    canon = _random_canon(family, dims, config, gen)
    save_model(canon, config, out_dir)
    return out_dir


def load_model_dir(model_dir: Path):
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        raise ValueError(f"{model_dir} has no model.safetensors (only safetensors checkpoints are supported)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    return cfg, sd
