"""Canonical per-layer weights and LoRA deltas, independent of a family's tensor layout.

Every family's layer is read into the same shapes (float64):

    q: (H·hd) × d    k, v: (KV·hd) × d    o: d × (H·hd)
    gate, up: F × d  (gate absent in non-gated MLPs)    down: d × F

Fused modules are split by their ``layout`` and joined back the same way, so a delta on a
fused query_key_value becomes q/k/v deltas and the reverse.
"""
from __future__ import annotations

import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.families import ROLES, Family, ModuleSpec
from lorasuite_core.models.loading import LoadedModel, Dims


def split_fused(spec: ModuleSpec, W: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
    if spec.layout != "interleaved_per_head":
        raise LorasuiteError(f"unknown fused layout {spec.layout!r} for module {spec.name}")
    if dims.num_kv_heads != dims.num_heads:
        raise LorasuiteError(f"fused layout {spec.layout!r} requires as many kv heads as query heads")
    per_head = W.reshape(dims.num_heads, 3, dims.head_dim, W.shape[-1])
    return {role: per_head[:, slot].reshape(dims.num_heads * dims.head_dim, -1) for slot, role in enumerate("qkv")}


def join_fused(spec: ModuleSpec, parts: dict[str, torch.Tensor], dims: Dims) -> torch.Tensor:
    width = next(iter(parts.values())).shape[-1]
    zeros = torch.zeros(dims.num_heads * dims.head_dim, width, dtype=torch.float64)
    stacked = [parts.get(role, zeros).reshape(dims.num_heads, dims.head_dim, width) for role in "qkv"]
    return torch.stack(stacked, dim=1).reshape(3 * dims.num_heads * dims.head_dim, width)


def layer_weights(model: LoadedModel, layer: int) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for spec in model.family.modules.values():
        W = model.layer_weight(layer, spec.path)
        if spec.role == "qkv":
            weights.update(split_fused(spec, W, model.dims))
        else:
            weights[spec.role] = W
    return weights


def expected_shape(family: Family, dims: Dims, role: str) -> tuple[int, int]:
    q_rows, kv_rows = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    return {
        "q": (q_rows, dims.hidden),
        "k": (kv_rows, dims.hidden),
        "v": (kv_rows, dims.hidden),
        "qkv": (q_rows + 2 * kv_rows, dims.hidden),
        "o": (dims.hidden, q_rows),
        "gate": (dims.intermediate, dims.hidden),
        "up": (dims.intermediate, dims.hidden),
        "down": (dims.hidden, dims.intermediate),
    }[role]


def canonical_deltas(family: Family, dims: Dims, module_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{PEFT module name: ΔW} of one layer -> {canonical role: ΔW}."""
    deltas: dict[str, torch.Tensor] = {}
    for name, delta in module_deltas.items():
        spec = family.modules[name]
        if spec.role == "qkv":
            deltas.update(split_fused(spec, delta, dims))
        else:
            deltas[spec.role] = delta
    return deltas


def module_deltas(family: Family, dims: Dims, deltas: dict, join=None) -> dict:
    """{canonical role: ΔW} -> {PEFT module name of this family: ΔW}; roles it lacks are dropped.

    ``join(spec, parts, dims)`` builds a fused module from its parts (default :func:`join_fused`,
    dense tensors; the transfer passes a joiner of factor pairs)."""
    join = join or join_fused
    out: dict = {}
    fused: dict[str, dict] = {}
    for role in ROLES:
        if role not in deltas:
            continue
        found = family.module_for_canonical_role(role)
        if found is None:
            continue
        spec, slot = found
        if slot is None:
            out[spec.name] = deltas[role]
        else:
            fused.setdefault(spec.name, {})[role] = deltas[role]
    for name, parts in fused.items():
        out[name] = join(family.modules[name], parts, dims)
    return out


def dropped_roles(family: Family, roles) -> list[str]:
    return [r for r in roles if family.module_for_canonical_role(r) is None]
