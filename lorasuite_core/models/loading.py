"""Loading base models and PEFT LoRA adapters — safetensors only.

A base model is a Hugging Face directory (config.json, *.safetensors, tokenizer files)
given as a local path, an fsspec URI (s3://…, materialised into a local cache first) or a
hub id (fetched with huggingface_hub, only json/safetensors/tokenizer files). Tensors are
read lazily, one shard at a time, through ``safe_open``; nothing is ever unpickled and
``trust_remote_code`` stays off.

An adapter is a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors). It is
parsed into per-(layer, module) factors ``A`` (r × in) and ``B`` (out × r) with the scaling PEFT
applies, so that PEFT's delta is ``ΔW = scaling · B A`` (``LoraFactors``); how each variant
(LoRA, DoRA, AdaLoRA) is read is in its module under :mod:`lorasuite_core.models.variants`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.families import Family, family_for_model_type
from lorasuite_core.models.variants import VARIANTS, supported_labels, variant_of
from lorasuite_core.models.variants.base import AdapterVariant, LoraFactors

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_local_dir(uri: str | Path, what: str) -> Path:
    """Local directory for a path, fsspec URI or hub id."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        from lorasuite_core.io.materialize import materialize_dir

        return Path(materialize_dir(text))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LorasuiteError(f"{what} {text!r} is not a directory")
        return path
    if HUB_ID.match(text):
        return _snapshot_from_hub(text, what)
    raise LorasuiteError(f"{what} {text!r} does not exist")


def _snapshot_from_hub(repo_id: str, what: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        )
    except Exception as exc:  # network, auth, missing repo: one clear line
        raise LorasuiteError(f"cannot fetch {what} {repo_id!r} from the hub: {type(exc).__name__}") from exc
    return Path(local)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise LorasuiteError(f"{what}: missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LorasuiteError(f"{what}: {path} is not valid JSON ({exc.msg})") from exc


@dataclass(frozen=True)
class Dims:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    norm_eps: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _dims_from_config(config: dict[str, Any], family: Family, uri: str = "") -> Dims:
    def get(name: str, default=None):
        value = family.config_value(config, name)
        if value is None and default is None:
            keys = family.config_keys.get(name) or name
            keys = " or ".join(repr(k) for k in ((keys,) if isinstance(keys, str) else keys))
            raise LorasuiteError(f"model {uri}: config.json lacks {keys} ({family.name} family)")
        return default if value is None else value

    hidden = int(get("hidden_size"))
    heads = int(get("num_heads"))
    per_hidden = family.intermediate_per_hidden
    return Dims(
        hidden=hidden,
        num_layers=int(get("num_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_kv_heads", heads)),
        head_dim=int(get("head_dim", hidden // heads)),
        intermediate=int(get("intermediate_size", per_hidden * hidden if per_hidden else None)),
        norm_eps=float(get("norm_eps", 1e-6)),
    )


def apply_norm(x: torch.Tensor, kind: str, gain: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Row-wise norm of x (n × d): LayerNorm g ⊙ (x − mean) / √(var + eps) + b, or RMSNorm g ⊙ x / √(mean x² + eps)."""
    if kind == "layer":
        x = x - x.mean(dim=-1, keepdim=True)
    elif kind != "rms":
        raise LorasuiteError(f"unknown norm kind {kind!r}")
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * gain
    return y if bias is None else y + bias


class SafetensorsWeights:
    """Lazy, read-only access to a checkpoint's tensors, one shard open at a time."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.shard_of = self._index()

    def _index(self) -> dict[str, str]:
        index_file = self.model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            return dict(_read_json(index_file, "model index")["weight_map"])
        shards = sorted(p.name for p in self.model_dir.glob("model*.safetensors"))
        if not shards:
            pickles = [p.name for p in self.model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise LorasuiteError(
                    f"{self.model_dir} holds only pickle checkpoints ({', '.join(pickles)}); "
                    "lorasuite never unpickles model files: convert them to safetensors"
                )
            raise LorasuiteError(f"no *.safetensors weights (model.safetensors or model-*-of-*.safetensors) in {self.model_dir}")
        shard_of = {}
        for shard in shards:
            for name in self._keys(shard):
                shard_of[name] = shard
        return shard_of

    def _keys(self, shard: str) -> list[str]:
        try:
            with safe_open(self.model_dir / shard, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise LorasuiteError(f"corrupt safetensors file {self.model_dir / shard}: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype; with ``rows`` (int64 ids, any order, repeats allowed) only those
        rows, read in windows of at most ROW_WINDOW consecutive rows that hold some of them (safetensors slices:
        rows outside the windows are never paged in, and no window is larger than ROW_WINDOW rows)."""
        if name not in self.shard_of:
            raise LorasuiteError(f"weight {name!r} not found in {self.model_dir}")
        path = self.model_dir / self.shard_of[name]
        try:
            with safe_open(path, framework="pt") as f:
                if rows is None:
                    tensor = f.get_tensor(name)
                else:
                    tensor = _gather_rows(f.get_slice(name), rows)
        except (SafetensorError, OSError, ValueError) as exc:
            raise LorasuiteError(f"corrupt safetensors file {path}: {exc}") from exc
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LorasuiteError(f"model {self.model_dir}: weight {name} holds NaN or Inf")
        return tensor


ROW_WINDOW = 4096   # rows read at once by SafetensorsWeights.get(name, rows): 25 MB of a 1536-wide float32 table


def _gather_rows(table, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` of a safetensors slice, reading one window of ≤ ROW_WINDOW consecutive rows at a time."""
    order = torch.argsort(rows, stable=True)
    wanted = rows[order]
    pieces, start = [], 0
    while start < len(wanted):
        lo = int(wanted[start])
        end = int(torch.searchsorted(wanted, lo + ROW_WINDOW))
        pieces.append(table[lo:int(wanted[end - 1]) + 1][wanted[start:end] - lo])
        start = end
    if not pieces:
        return table[0:0]
    gathered = torch.cat(pieces)
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


@dataclass
class LoadedModel:
    """A base model on local disk: config facts, its family, lazy weights."""

    source: str
    local_dir: Path
    config: dict[str, Any]
    family: Family
    dims: Dims
    weights: SafetensorsWeights = field(repr=False)

    def weight(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.weights.get(name, rows).to(torch.float64)

    def layer_weight(self, layer: int, path: str, suffix: str = "weight") -> torch.Tensor:
        return self.weight(self.family.layer_weight(layer, path, suffix))

    def norm_gain(self, layer: int, norm_role: str) -> torch.Tensor | None:
        """Effective per-dimension gain of a norm (weight + family offset), or None if absent."""
        norm = self.family.norms.get(norm_role)
        if norm is None:
            return None
        return self.layer_weight(layer, norm) + self.family.norm_weight_offset

    def norm_bias(self, layer: int, norm_role: str) -> torch.Tensor | None:
        norm = self.family.norms.get(norm_role)
        name = self.family.layer_weight(layer, norm, "bias") if norm else None
        return self.weight(name) if name and name in self.weights else None

    @cached_property
    def embedding_scale(self) -> float:
        return self.dims.hidden ** 0.5 if self.family.embedding_scale == "sqrt_hidden" else 1.0

    def effective_embeddings(self, ids=None) -> torch.Tensor:
        """What the first layer receives for each token id (vocab × hidden, float64): the embedding
        rows times the family's scale, through the family's embedding norm where it has one.

        ``ids`` (any integer sequence): only those rows (len(ids) × hidden), read alone from the
        checkpoint; the operations are row-wise, so the values equal the full table's rows."""
        rows = None if ids is None else torch.as_tensor(ids, dtype=torch.long)
        E = self.weight(self.family.embedding, rows) * self.embedding_scale
        norm = self.family.embedding_norm
        if norm is None:
            return E
        gain = self.weight(f"{norm}.weight") + self.family.norm_weight_offset
        bias = self.weight(f"{norm}.bias") if f"{norm}.bias" in self.weights else None
        return apply_norm(E, self.family.norm_kind, gain, bias, self.dims.norm_eps)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.local_dir, trust_remote_code=False)
        except Exception as exc:
            raise LorasuiteError(f"cannot load the tokenizer of {self.source}: {exc}") from exc

    def load_torch_model(self, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.local_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
        except Exception as exc:
            raise LorasuiteError(f"cannot load model {self.source}: {exc}") from exc
        return model.eval()


def load_base_model(uri: str | Path) -> LoadedModel:
    local = resolve_local_dir(uri, "model")
    config = _read_json(local / "config.json", f"model {uri}")
    model_type = config.get("model_type")
    if not model_type:
        raise LorasuiteError(f"model {uri}: config.json has no model_type")
    family = family_for_model_type(model_type)
    mismatches = family.config_mismatches(config)
    if mismatches:
        raise LorasuiteError(f"model {uri}: {', '.join(mismatches)} is not supported for the {family.name} family")
    weights = SafetensorsWeights(local)
    if family.embedding not in weights:
        raise LorasuiteError(f"model {uri}: weight {family.embedding!r} missing (not a {family.name} checkpoint?)")
    return LoadedModel(str(uri), local, config, family, _dims_from_config(config, family, str(uri)), weights)


@dataclass
class LoraAdapter:
    source: str
    local_dir: Path
    config: dict[str, Any]
    factors: dict[tuple[int, str], LoraFactors]   # (layer, PEFT module name) -> factors

    @property
    def target_names(self) -> set[str]:
        return {name for _, name in self.factors}

    @property
    def variant(self) -> AdapterVariant:
        """The adapter's method (LoRA, DoRA or AdaLoRA), from adapter_config.json."""
        return variant_of(self.config)


UNSUPPORTED_LORA_OPTIONS = {"lora_bias": "LoRA bias terms"}


def _check_lora_config(config: dict[str, Any], uri: str) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in {v.peft_type for v in VARIANTS.values()}:
        raise LorasuiteError(f"adapter {uri}: peft_type {config.get('peft_type')!r} is not supported "
                             f"({supported_labels()})")
    for key, label in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(key):
            raise LorasuiteError(f"adapter {uri}: {label} ({key}=true) is not supported yet")
    variant_of(config).check_config(config, uri)


def _check_target_names(config: dict[str, Any], family: Family, uri: str) -> None:
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return  # a regex: checked module by module when the tensors are parsed
    unknown = sorted({t.split(".")[-1] for t in targets} - set(family.modules))
    if unknown:
        raise LorasuiteError(
            f"adapter {uri}: target modules {', '.join(unknown)} are not LoRA targets lorasuite knows for the "
            f"{family.name} family (known: {', '.join(family.modules)})"
        )


LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>"
                      + "|".join(sorted(set().union(*(v.parts for v in VARIANTS.values())))) + ")"
                      r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")


def _parse_module_key(module: str, family: Family, uri: str) -> tuple[int, str]:
    prefix = re.escape(family.layer_prefix).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    for spec in family.modules.values():
        match = re.fullmatch(prefix + re.escape(spec.path), module)
        if match:
            return int(match.group("layer")), spec.name
    known = ", ".join(family.modules)
    raise LorasuiteError(
        f"adapter {uri}: module {module!r} is not a LoRA target lorasuite knows for the "
        f"{family.name} family (known: {known})"
    )


def load_lora_adapter(uri: str | Path, family: Family) -> LoraAdapter:
    local = resolve_local_dir(uri, "adapter")
    config = _read_json(local / "adapter_config.json", f"adapter {uri}")
    _check_lora_config(config, str(uri))
    _check_target_names(config, family, str(uri))
    weights_file = local / "adapter_model.safetensors"
    if not weights_file.is_file():
        pickles = [p.name for p in local.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle files {', '.join(pickles)}; lorasuite never unpickles them)" if pickles else ""
        raise LorasuiteError(f"adapter {uri}: missing adapter_model.safetensors{hint}")
    tensors = _read_safetensors(weights_file)
    factors = _collect_factors(tensors, config, family, str(uri))
    if not factors:
        raise LorasuiteError(f"adapter {uri}: no LoRA weights found")
    return LoraAdapter(str(uri), local, config, factors)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LorasuiteError(f"corrupt safetensors file {path}: {exc}") from exc


def _collect_factors(tensors, config, family, uri) -> dict[tuple[int, str], LoraFactors]:
    variant = variant_of(config)
    wanted = variant.parts
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if not match or match.group("ab") not in wanted:
            names = "/".join(f"lora_{p}" for p in sorted(wanted))
            raise LorasuiteError(f"adapter {uri}: unexpected tensor {key!r} (a {variant.name} adapter holds {names})")
        if not tensor.is_floating_point():
            raise LorasuiteError(f"adapter {uri}: tensor {key} is {str(tensor.dtype).replace('torch.', '')}, not "
                                 "floating point (quantised LoRA weights are not supported)")
        if match.group("ab") in ("A", "B") and tensor.dim() != 2:
            raise LorasuiteError(f"adapter {uri}: tensor {key} has shape {tuple(tensor.shape)}, expected a matrix")
        if not torch.isfinite(tensor).all():
            raise LorasuiteError(f"adapter {uri}: tensor {key} holds NaN or Inf")
        parts.setdefault(match.group("module"), {})[match.group("ab")] = tensor
    factors = {}
    for module, ab in parts.items():
        if set(ab) != wanted:
            missing = ", ".join(f"lora_{p}" for p in sorted(wanted - set(ab)))
            raise LorasuiteError(f"adapter {uri}: module {module!r} lacks {missing}")
        layer, name = _parse_module_key(module, family, uri)
        A, B = ab["A"].double(), ab["B"].double()
        if A.shape[0] != B.shape[1]:
            raise LorasuiteError(f"adapter {uri}: {module} has lora_A rank {A.shape[0]} but lora_B rank {B.shape[1]}")
        variant.check_rank(module, A.shape[0], config, uri)
        read = variant.read_module(A, B, ab, config, module, uri)
        if read is not None:                 # None: nothing to carry (a fully pruned AdaLoRA module)
            factors[(layer, name)] = read
    return factors

