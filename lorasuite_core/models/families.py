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

Optional facts (defaults in brackets, so a family JSON names only what it needs):

    config_keys          a value may be a list of alternative config.json keys, the first one
                         present wins (BLOOM checkpoints write ``n_embed`` or ``hidden_size``)
    intermediate_per_hidden  MLP width as a multiple of hidden_size when the config has no
                         intermediate size key [null: the key is required]
    embedding_norm       weight prefix of a norm (the family's norm kind) applied to the
                         embedding rows before the first layer, e.g. BLOOM's
                         word_embeddings_layernorm [null]
    position_encoding    "rotary" or "alibi" ["rotary"]. Under ALiBi head h adds the bias
                         −m_h·(i − j) with a slope m_h that depends on h *and* on the number of
                         heads, so a head's index is part of its function: heads cannot be
                         permuted, added or moved to another index without changing what they
                         compute (``head_index_fixed``)
    config_requires      {config.json key: value} the family's layout assumes, an absent key
                         taking that value (BLOOM: apply_residual_connection_post_layernorm
                         false, i.e. the residual is the block input, not its normed copy) [{}]

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
POSITION_ENCODINGS = ("rotary", "alibi")


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
    config_keys: dict[str, str | tuple[str, ...] | None]
    norm_kind: str
    norm_weight_offset: float
    norms: dict[str, str | None]
    modules: dict[str, ModuleSpec]
    intermediate_per_hidden: int | None = None
    embedding_norm: str | None = None
    position_encoding: str = "rotary"
    config_requires: tuple[tuple[str, Any], ...] = ()

    @property
    def head_index_fixed(self) -> bool:
        """True when a head's index (and the head count) is part of what it computes (ALiBi)."""
        return self.position_encoding == "alibi"

    def config_value(self, config: dict[str, Any], name: str):
        """The config.json value of canonical key ``name`` (first alternative present), or None."""
        keys = self.config_keys.get(name)
        for key in (keys,) if isinstance(keys, str) else (keys or ()):
            if config.get(key) is not None:
                return config[key]
        return None

    def config_mismatches(self, config: dict[str, Any]) -> list[str]:
        """``key=value`` for each config value the family's layout does not support."""
        return [f"{key}={config[key]!r}" for key, want in self.config_requires if config.get(key, want) != want]

    def layer_weight(self, layer: int, path: str, suffix: str = "weight") -> str:
        return f"{self.layer_prefix.format(layer=layer)}{path}.{suffix}"

    def module_key(self, layer: int, name: str) -> str:
        """The full module path of PEFT module ``name`` on ``layer`` (e.g. ``model.layers.3.self_attn.q_proj``)."""
        return f"{self.layer_prefix.format(layer=layer)}{self.modules[name].path}"

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
    position_encoding = data.get("position_encoding", "rotary")
    if position_encoding not in POSITION_ENCODINGS:
        raise ValueError(f"family {data['family']}: position_encoding {position_encoding!r} not in {POSITION_ENCODINGS}")
    return Family(
        name=data["family"],
        model_types=tuple(data["model_types"]),
        layer_prefix=data["layer_prefix"],
        embedding=data["embedding"],
        embedding_scale=data["embedding_scale"],
        config_keys={k: tuple(v) if isinstance(v, list) else v for k, v in data["config_keys"].items()},
        norm_kind=data["norm"]["kind"],
        norm_weight_offset=float(data["norm"]["weight_offset"]),
        norms=dict(data["norms"]),
        modules=modules,
        intermediate_per_hidden=data.get("intermediate_per_hidden"),
        embedding_norm=data.get("embedding_norm"),
        position_encoding=position_encoding,
        config_requires=tuple(sorted(data.get("config_requires", {}).items())),
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
