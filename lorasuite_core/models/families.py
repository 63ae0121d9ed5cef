"""Architecture families as data.

Each supported family is one JSON file in ``architectures/`` (the way mergekit keeps its
architecture definitions): the ``model_type`` values it covers, weight-name templates,
which norm precedes or follows each sub-block, the norm kind, the embedding scale and the
LoRA-targetable modules with their *role*:

    q, k, v   input-facing attention projections (rows grouped by head)
    qkv       fused q/k/v projection; ``layout`` says how the rows interleave
    o         output-facing attention projection (columns grouped by head)
    gate, up  input-facing MLP projections (rows = neurons)
    down      output-facing MLP projection (columns = neurons)

Code paths read these facts; no model name appears in them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from lorasuite_core.errors import LorasuiteError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModuleSpec:
    name: str      # PEFT target name, e.g. "q_proj"
    path: str      # path inside a layer, e.g. "self_attn.q_proj"
    role: str      # one of ROLES or "qkv"
    layout: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_prefix: str
    embedding: str
    embedding_scale: str
    config_keys: dict[str, str | None]
    norm_kind: str
    norm_weight_offset: float
    norms: dict[str, str | None]
    modules: dict[str, ModuleSpec]

    def layer_weight(self, layer: int, path: str, suffix: str = "weight") -> str:
        return f"{self.layer_prefix.format(layer=layer)}{path}.{suffix}"

    def module_by_role(self, role: str) -> ModuleSpec | None:
        for spec in self.modules.values():
            if spec.role == role:
                return spec
        return None

    def module_for_canonical_role(self, role: str) -> tuple[ModuleSpec, int | None] | None:
        """Module holding canonical role ``role``; for fused modules also the slot index."""
        direct = self.module_by_role(role)
        if direct is not None:
            return direct, None
        fused = self.module_by_role("qkv")
        if fused is not None and role in ("q", "k", "v"):
            return fused, "qkv".index(role)
        return None


def _family_from_json(data: dict[str, Any]) -> Family:
    modules = {
        name: ModuleSpec(name=name, path=m["path"], role=m["role"], layout=m.get("layout"))
        for name, m in data["modules"].items()
    }
    return Family(
        name=data["family"],
        model_types=tuple(data["model_types"]),
        layer_prefix=data["layer_prefix"],
        embedding=data["embedding"],
        embedding_scale=data["embedding_scale"],
        config_keys=dict(data["config_keys"]),
        norm_kind=data["norm"]["kind"],
        norm_weight_offset=float(data["norm"]["weight_offset"]),
        norms=dict(data["norms"]),
        modules=modules,
    )


@lru_cache(maxsize=1)
def all_families() -> dict[str, Family]:
    families = {}
    for entry in resources.files("lorasuite_core.models.architectures").iterdir():
        if entry.name.endswith(".json"):
            family = _family_from_json(json.loads(entry.read_text()))
            families[family.name] = family
    return families


def supported_model_types() -> list[str]:
    return sorted(t for f in all_families().values() for t in f.model_types)


def family_for_model_type(model_type: str) -> Family:
    for family in all_families().values():
        if model_type in family.model_types:
            return family
    raise LorasuiteError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )
