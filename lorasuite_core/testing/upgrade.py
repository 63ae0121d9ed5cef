"""Ground-truth generator: *function-preserving* upgrades of Hugging Face models.

These modules (``tokenizer``, ``model``, ``upgrade_steps``, ``upgrade``, ``adapter``) are the
independent ground truth for the exactness tests, the demo and the benchmark.
``model`` builds tiny random causal LMs of five families, ``upgrade_model_dir`` "upgrades" one to a
bigger / re-parameterised model that computes exactly the same function (the steps and their math:
``upgrade_steps``), and records the correspondence (token ids, layers, heads, neurons, residual basis)
in ``lorasuite_upgrade.json``.  It depends only on torch, transformers, tokenizers and safetensors, and
imports nothing else from ``lorasuite_core``.

All arithmetic is done in float64 and the result is stored in float32, so the upgraded model agrees
with the original up to float32 rounding (relative max logit error ~1e-6).  Module names never
change (only shapes and counts), so an old PEFT adapter stays meaningful under ``layer_map``.

Ground truth files written next to the upgraded model:
  * ``lorasuite_upgrade.json``: ``token_map`` (old id -> new id), ``layer_map`` (old layer -> new
    layer), ``spec``, plus ``heads`` / ``kv_heads`` / ``neurons`` maps (per *old* layer: for every new
    index, the old index it came from or ``null`` for new units), dims, and flags.
  * ``lorasuite_upgrade.safetensors``: ``residual`` = ``T`` (``D x d``, float64) with
    ``h_new = T @ h_old`` at every layer boundary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from .model import FUSED_QKV, dims_of_config, family_of_config, from_hf, load_model_dir, save_model
from .tokenizer import upgrade_tokenizer
from .upgrade_steps import (
    step_fold,
    step_heads,
    step_identity_layers,
    step_neurons,
    step_rotate,
    step_vocab,
    step_widen,
)

__all__ = ["UpgradeSpec", "upgrade_model_dir", "GROUND_TRUTH_FILE", "RESIDUAL_FILE"]

GROUND_TRUTH_FILE = "lorasuite_upgrade.json"
RESIDUAL_FILE = "lorasuite_upgrade.safetensors"

# config.json keys of the dims the upgrade changes (bloom writes n_layer / n_head and has no MLP width)
_CONFIG_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "inter": "intermediate_size"}
_FAMILY_CONFIG_KEYS = {"bloom": {"layers": "n_layer", "heads": "n_head", "inter": None}}


@dataclass(frozen=True)
class UpgradeSpec:
    """Which function-preserving transformations to apply (the math: ``upgrade_steps``).

    Applied in the order: fold norms, vocabulary (extra then renumber), MLP neurons (extra then
    permute), heads (kv replication, extra query heads per *new* kv group, permutation), residual
    (widen then rotate), identity layers.  ``rotate_residual`` on llama/qwen2 implies ``fold_norms``
    (an orthogonal rotation only commutes with scalar norm weights).  Unsupported combinations raise
    ``ValueError``: widen / kv replication / extra heads on gpt_neox and bloom, head permutation and
    extra neurons on bloom (ALiBi slopes, fixed MLP width), a ``kv_replication`` that does
    not divide the query-group size, and (llama, gemma3) a new ``hidden_size`` not divisible by the
    new number of heads, which transformers' config validation rejects.
    """

    rotate_residual: bool = False  # llama/qwen2: orthogonal; gemma3: signed permutation; gpt_neox/bloom: permutation
    widen_residual: int = 0  # zero dims added to the residual (not gpt_neox/bloom)
    fold_norms: bool = False  # fold norm weights into the following linears
    permute_heads: bool = False  # permute kv groups and query heads within groups (not bloom)
    extra_query_heads_per_group: int = 0  # new query heads (zero o_proj columns) per kv group (not gpt_neox/bloom)
    kv_replication: int = 1  # copy every kv head this many times (not gpt_neox/bloom)
    permute_neurons: bool = False
    extra_neurons: int = 0  # new MLP neurons with zero down_proj columns (not bloom)
    identity_layers: tuple[int, ...] = ()  # positions of inserted zero-output layers in the NEW layer list
    extra_vocab: int = 0  # new tokens (new strings)
    added_token_logits: str = "mean"  # "mean": lm_head rows = mean of the old rows (greedy never picks them); "random"
    renumber_vocab: bool = False  # permute token ids
    seed: int = 0


ADDED_TOKEN_LOGITS = ("mean", "random")


def _check_spec(spec: UpgradeSpec, family: str, dims: dict) -> None:
    for name in ("widen_residual", "extra_query_heads_per_group", "extra_neurons", "extra_vocab"):
        v = getattr(spec, name)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"UpgradeSpec.{name} must be a non-negative int, got {v!r}")
    if spec.added_token_logits not in ADDED_TOKEN_LOGITS:
        raise ValueError(f"UpgradeSpec.added_token_logits must be one of {ADDED_TOKEN_LOGITS}, got {spec.added_token_logits!r}")
    if not isinstance(spec.kv_replication, int) or spec.kv_replication < 1:
        raise ValueError(f"UpgradeSpec.kv_replication must be an int >= 1, got {spec.kv_replication!r}")
    if family == "bloom":
        if spec.widen_residual:
            raise ValueError("widen_residual is not function-preserving for bloom: LayerNorm subtracts the mean over "
                             "all hidden dims, which zero-padding changes, and head_dim = hidden_size / n_head")
        if spec.permute_heads:
            raise ValueError("permute_heads is not function-preserving for bloom: ALiBi gives every head index its "
                             "own slope, so a permuted head attends with another slope")
        if spec.extra_query_heads_per_group:
            raise ValueError("extra_query_heads_per_group is not function-preserving for bloom: ALiBi slopes depend "
                             "on the number of heads (and head_dim = hidden_size / n_head), so even a head with a "
                             "zero dense column changes the other heads")
        if spec.kv_replication != 1:
            raise ValueError("kv_replication is not supported for bloom (multi-head attention with a fused "
                             "query_key_value; the number of kv heads always equals the number of heads)")
        if spec.extra_neurons:
            raise ValueError("extra_neurons is not supported for bloom: its MLP is exactly 4 * hidden_size wide "
                             "(no config field for the intermediate size)")
    if family == "gpt_neox":
        if spec.widen_residual:
            raise ValueError("widen_residual is not function-preserving for gpt_neox: LayerNorm subtracts the "
                             "mean over all hidden dims, which zero-padding changes")
        if spec.extra_query_heads_per_group:
            raise ValueError("extra_query_heads_per_group is not supported for gpt_neox: its head size is "
                             "hidden_size // num_attention_heads, so adding heads would change the head size")
        if spec.kv_replication != 1:
            raise ValueError("kv_replication is not supported for gpt_neox (multi-head attention with a fused "
                             "query_key_value; the number of kv heads always equals the number of heads)")
    G = dims["heads"] // dims["kv_heads"]
    if G % spec.kv_replication:
        raise ValueError(f"kv_replication={spec.kv_replication} must divide the query group size "
                         f"{G} (= {dims['heads']} heads / {dims['kv_heads']} kv heads)")
    n_new = dims["layers"] + len(spec.identity_layers)
    pos = list(spec.identity_layers)
    if len(set(pos)) != len(pos) or any((not isinstance(p, int)) or p < 0 or p >= n_new for p in pos):
        raise ValueError(f"identity_layers must be distinct positions in the new layer list [0, {n_new}), got {pos}")
    new_heads = (G // spec.kv_replication + spec.extra_query_heads_per_group) * dims["kv_heads"] * spec.kv_replication
    new_hidden = dims["hidden"] + spec.widen_residual
    if family in ("llama", "gemma3") and new_hidden % new_heads:
        raise ValueError(
            f"transformers requires hidden_size % num_attention_heads == 0 for {family}: the upgrade would give "
            f"hidden_size={new_hidden} and num_attention_heads={new_heads}; change widen_residual / "
            f"extra_query_heads_per_group / kv_replication")


def upgrade_model_dir(old_dir, new_dir, spec: UpgradeSpec) -> Path:
    """Write an exactly function-preserving upgrade of the HF model in ``old_dir`` into ``new_dir``.

    Also writes the ground truth ``lorasuite_upgrade.json`` (token_map, layer_map, spec, head /
    neuron maps) and ``lorasuite_upgrade.safetensors`` (the residual transform ``T``).
    """
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    cfg, sd = load_model_dir(old_dir)
    family = family_of_config(cfg)
    old_dims = dims_of_config(family, cfg)
    _check_spec(spec, family, old_dims)
    canon = from_hf(family, cfg, sd)
    gen = torch.Generator().manual_seed(int(spec.seed) * 7919 + 17)
    rng = random.Random(int(spec.seed) * 104729 + 3)

    was_tied = canon["tied"]
    force_fold = spec.rotate_residual and family in ("llama", "qwen2")
    do_fold = spec.fold_norms or force_fold
    fold_final = do_fold and (not was_tied or force_fold)
    if do_fold:
        step_fold(canon, fold_final)
    if fold_final and was_tied:
        canon["tied"] = False  # the folded lm_head differs from the embedding from now on

    n_rows_old = canon["embed"].shape[0]
    perm = step_vocab(canon, spec.extra_vocab, spec.renumber_vocab, gen, spec.added_token_logits)
    neuron_maps = step_neurons(canon, spec.extra_neurons, spec.permute_neurons, gen)
    q_maps, kv_maps = step_heads(canon, spec.kv_replication, spec.extra_query_heads_per_group, spec.permute_heads, gen)

    d_old = canon["dims"]["hidden"]
    T = torch.eye(d_old, dtype=torch.float64)
    if spec.widen_residual:
        T = step_widen(canon, spec.widen_residual, gen)
    if spec.rotate_residual:
        T = step_rotate(canon, gen) @ T

    layer_types = list(cfg.layer_types) if getattr(cfg, "layer_types", None) is not None else None
    layer_map, new_types = step_identity_layers(canon, tuple(sorted(spec.identity_layers)), layer_types, gen)

    tied_new = canon["tied"] and torch.equal(canon["lm_head"]["w"], canon["embed"])
    canon["tied"] = tied_new

    # ---- config
    dims = canon["dims"]
    cfg_dict = cfg.to_dict()
    token_map = {i: perm[i] for i in range(n_rows_old)}

    def map_id(x):
        if x is None:
            return None
        if isinstance(x, list):
            return [token_map[i] for i in x]
        return token_map[x]

    keys = _FAMILY_CONFIG_KEYS.get(family, _CONFIG_KEYS)
    cfg_dict.update({keys[k]: dims[k] for k in ("layers", "heads", "inter") if keys[k] is not None})
    cfg_dict.update(
        hidden_size=dims["hidden"],
        vocab_size=dims["vocab"],
        tie_word_embeddings=tied_new,
        bos_token_id=map_id(cfg_dict.get("bos_token_id")),
        eos_token_id=map_id(cfg_dict.get("eos_token_id")),
        pad_token_id=map_id(cfg_dict.get("pad_token_id")),
        dtype="float32",
    )
    if family not in FUSED_QKV:
        cfg_dict.update(num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"])
    if new_types is not None:
        cfg_dict["layer_types"] = new_types
    for k in ("_name_or_path", "transformers_version", "architectures"):
        cfg_dict.pop(k, None)
    new_cfg = AutoConfig.for_model(**cfg_dict)
    if dims_of_config(family, new_cfg) != dims:
        raise RuntimeError(f"internal: config dims {dims_of_config(family, new_cfg)} != {dims}")

    new_dir.mkdir(parents=True, exist_ok=True)
    save_model(canon, new_cfg, new_dir)
    new_strings = upgrade_tokenizer(old_dir, new_dir, n_rows_old, spec.extra_vocab, perm, rng)

    # ---- ground truth
    def per_old_layer(maps):
        return {str(i): m for i, m in enumerate(maps)}

    spec_dict = dataclasses.asdict(spec)
    spec_dict["identity_layers"] = list(spec.identity_layers)
    truth = {
        "format": 1,
        "family": family,
        "spec": spec_dict,
        "token_map": {str(k): v for k, v in token_map.items()},
        "layer_map": {str(k): v for k, v in layer_map.items()},
        "new_token_ids": [perm[n_rows_old + j] for j in range(spec.extra_vocab)],
        "new_token_strings": new_strings,
        "old_dims": old_dims,
        "new_dims": dict(dims),
        "residual_scale": math.sqrt(dims["hidden"] / d_old),
        "norms_folded": do_fold,
        "final_norm_folded": fold_final,
        "tie_word_embeddings": {"old": was_tied, "new": tied_new},
        "heads": per_old_layer(q_maps),
        "kv_heads": per_old_layer(kv_maps),
        "neurons": per_old_layer(neuron_maps),
        "residual_file": RESIDUAL_FILE,
    }
    (new_dir / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1), encoding="utf-8")
    save_file({"residual": T.contiguous()}, str(new_dir / RESIDUAL_FILE))
    return new_dir
