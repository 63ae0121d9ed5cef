"""The transfer of one LoRA adapter: the pieces the stages (:mod:`lorasuite_core.pipeline.stages`) call.

Data flow (each step is a stage of :mod:`lorasuite_core.pipeline.stages`, run by the Prefect flows as
tasks and by :func:`lorasuite_core.pipeline.stages.migrate_in_process` sequentially):

    pair analysis (adapter-independent, cacheable per model pair)
      vocabulary      shared tokens by normalised surface form
      transfer_matrix residual maps P, Q from the shared embeddings          residual.py
      activations     paired hidden states on calibration text               activations.py
      cka             CKA of layer updates (and of states) for all pairs     cka.py
      layer_mapping   monotone DP on the update CKA                          layer_mapping.py
      head_similarity per mapped pair: head + neuron matching                matching.py
                      (transfer_fit activations: residual maps per pair     activation_fit.py)
      unit_maps       per mapped pair and role: the unit maps M, their fit   unit_maps.py (layer_unit_maps)
    adapter transfer
      transfer        per mapped pair: canonical deltas carried through M    unit_maps.py (CarriedLayer)
      refactorise     QR + small SVD back to each module's rank              refactor.py
      write           PEFT directory, atomically                             models/writing.py
                      + migration_report.json                                report/migration.py

Deltas stay in factor form ΔW = L R (refactor.LowRank) from the old adapter (L = s B, R = A)
to the re-factorisation; no dense out × in delta is formed. A fused module splits by rows of
L (each part keeps R); joining parts P_q, P_k, P_v back stacks their rows with the lefts in
disjoint column blocks, [L_q R_q; L_k R_k; L_v R_v] = L R with L the interleaved rows of
[L_q 0 0; 0 L_k 0; 0 0 L_v] and R = [R_q; R_k; R_v]. The LayerNorm-offset diagnostic uses
‖ΔW c‖ = ‖L (R c)‖ and ‖ΔW‖_F² = ⟨LᵀL, R Rᵀ⟩_F.

Variants (the adapter's ``variant``, :mod:`lorasuite_core.models.variants`). LoRA and DoRA re-factorise to
s B A = ΔW with B = U√Σ, A = √ΣVᵀ; DoRA also carries its effective change and fits the new
magnitude vector (dora.py: m'_o = ⟨D_o, V_o⟩, exact where the row normalisation commutes with
the upgrade, the residual reported otherwise). AdaLoRA re-factorises to PEFT's SVD form
c P diag(E) Q = ΔW (refactor.py, ``singular_values=True``), keeps each module's (pruned) rank
and writes the rank budget back as PEFT's boolean ``rank_pattern`` masks over init_r.

Zero-initialised extra modules (``combine_layers(..., zero_init_unmapped=True)``): every new
layer the migration leaves without modules (no old layer with adapter weights maps onto it)
gets the adapter's target modules at its usual rank with PEFT's own fresh initialisation, drawn
from one seeded generator in (layer, module name) order: LoRA/DoRA A ~ kaiming-uniform(a=√5)
= U(−1/√in, 1/√in), B = 0 (DoRA magnitude ‖W_new‖_row, so W' = W); AdaLoRA E = 0, A, B ~
N(0, 0.02²). Their delta is zero, so the migrated start is unchanged and LFT trains every
layer, as vanilla LoRA does. A DoRA module is not added on a weight with an all-zero row (a
zero-output layer's o/down): PEFT's DoRA would divide 0 by 0 there.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.transfer.activation_fit import ActivationFit, layer_maps as activation_maps
from lorasuite_core.transfer.dora import carry_dense, effective_change, fit_magnitude
from lorasuite_core.transfer.layer_weights import (canonical_deltas, dropped_roles, expected_shape, join_fused, layer_weights,
                                                   module_deltas, split_fused)
from lorasuite_core.models.loading import LoadedModel, LoraAdapter
from lorasuite_core.models.variants.base import LoraFactors
from lorasuite_core.transfer.matching import LayerMatch, match_layer
from lorasuite_core.transfer.refactor import LowRank, Refactorised, refactorise
from lorasuite_core.transfer.residual import ResidualTransfer, input_map, input_offset, output_map
from lorasuite_core.transfer.unit_maps import CarriedLayer, RoleMap, role_maps
from lorasuite_core.transfer.vocab import SharedVocabulary

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pair analysis


@dataclass
class PairAnalysis:
    shared: SharedVocabulary
    residual: ResidualTransfer
    cka_updates: np.ndarray          # L_o × L_n
    cka_states: np.ndarray           # (L_o + 1) × (L_n + 1)
    layer_mapping: list[tuple[int, int]]
    matches: dict[int, LayerMatch] = field(default_factory=dict)   # old layer -> match
    calibration: dict[str, Any] = field(default_factory=dict)
    # transfer_fit "activations" (activation_fit.py): (old i, new j) -> its fitted residual maps
    activation_fits: dict[tuple[int, int], ActivationFit] = field(default_factory=dict)


def layer_pair_maps(old: LoadedModel, new: LoadedModel, rt: ResidualTransfer, i: int, j: int) -> dict[str, torch.Tensor]:
    """The four residual-side maps of old layer i against new layer j."""
    maps = {}
    for role in ("attention_input", "mlp_input"):
        maps[role] = input_map(rt, old.norm_gain(i, role), new.norm_gain(j, role))
    for role in ("attention_output", "mlp_output"):
        maps[role] = output_map(rt, old.norm_gain(i, role), new.norm_gain(j, role))
    return maps


def pair_maps(old: LoadedModel, new: LoadedModel, analysis: PairAnalysis, i: int, j: int) -> dict[str, torch.Tensor]:
    """The maps fitted on activations for (i, j) where the analysis has them, else the weight-based ones."""
    fit = analysis.activation_fits.get((i, j))
    return activation_maps(old, new, fit, i, j) if fit is not None else layer_pair_maps(old, new, analysis.residual, i, j)


def effective_head_mapping(old: LoadedModel, new: LoadedModel, head_mapping: str) -> str:
    """``head_mapping``, except that heads keep their indices where either family fixes them (ALiBi: a
    head's slope depends on its index, so moving a head changes what it computes)."""
    if head_mapping == "hungarian" and (old.family.head_index_fixed or new.family.head_index_fixed):
        return "identity"
    return head_mapping


def match_layer_pair(old: LoadedModel, new: LoadedModel, rt: ResidualTransfer, i: int, j: int,
                     head_mapping: str = "hungarian", maps: dict[str, torch.Tensor] | None = None) -> LayerMatch:
    """Heads and neurons of old layer ``i`` matched to new layer ``j`` (:func:`effective_head_mapping`),
    through ``maps`` where given (fitted on activations), else the weight-based residual maps."""
    maps = maps if maps is not None else layer_pair_maps(old, new, rt, i, j)
    return match_layer(layer_weights(old, i), layer_weights(new, j), old.dims, new.dims, maps,
                       effective_head_mapping(old, new, head_mapping))


# ----------------------------------------------------------------------------- adapter checks


def check_adapter_fits(adapter: LoraAdapter, old: LoadedModel) -> None:
    for (layer, name), f in sorted(adapter.factors.items()):
        if layer >= old.dims.num_layers:
            raise LorasuiteError(f"adapter {adapter.source}: layer {layer} does not exist in the old model ({old.dims.num_layers} layers)")
        spec = old.family.modules[name]
        out_dim, in_dim = expected_shape(old.family, old.dims, spec.role)
        if f.A.shape[1] != in_dim or f.B.shape[0] != out_dim:
            raise LorasuiteError(
                f"adapter {adapter.source}: layer {layer} {name} is {f.B.shape[0]}×{f.A.shape[1]} but the old "
                f"model's {name} is {out_dim}×{in_dim}: the adapter was not trained on this model"
            )


# ----------------------------------------------------------------------------- transfer


@dataclass
class MigratedModule:
    layer: int
    name: str
    factors: Refactorised
    rank: int
    alpha: float
    old_layers: list[int]
    magnitude: torch.Tensor | None = None          # DoRA (out,), float32
    magnitude_fit: dict[str, float] | None = None  # DoRA: dora.MagnitudeFit.report()


@dataclass
class MigratedAdapter:
    modules: list[MigratedModule]
    unit_fit: dict[str, float]
    dropped: list[str]
    input_offsets: dict[str, float]
    zero_init_layers: list[int] = field(default_factory=list)


def _layer_deltas(adapter: LoraAdapter, layer: int) -> dict[str, LowRank]:
    return {name: LowRank.of_lora(f.B, f.A, f.scaling) for (l, name), f in adapter.factors.items() if l == layer}


def canonical_factors(family, dims, deltas: dict[str, LowRank]) -> dict[str, LowRank]:
    """{PEFT module name: ΔW} of one layer -> {canonical role: ΔW}, in factor form."""
    out: dict[str, LowRank] = {}
    for name, delta in deltas.items():
        spec = family.modules[name]
        if spec.role == "qkv":
            out.update({role: LowRank(L, delta.right) for role, L in split_fused(spec, delta.left, dims).items()})
        else:
            out[spec.role] = delta
    return out


def _join_fused_factors(spec, parts: dict[str, LowRank], dims) -> LowRank:
    k = sum(p.rank for p in parts.values())
    lefts, start = {}, 0
    for role, p in parts.items():
        lefts[role] = torch.zeros(p.shape[0], k, dtype=torch.float64)
        lefts[role][:, start:start + p.rank] = p.left
        start += p.rank
    return LowRank(join_fused(spec, lefts, dims), torch.cat([p.right for p in parts.values()]))


def module_factors(family, dims, deltas: dict[str, LowRank]) -> dict[str, LowRank]:
    """{canonical role: ΔW} -> {PEFT module name of this family: ΔW} in factor form; roles it lacks are dropped."""
    return module_deltas(family, dims, deltas, join=_join_fused_factors)


def _source_factors(old: LoadedModel, new: LoadedModel, adapter: LoraAdapter, new_name: str, sources: list[int]) -> LoraFactors:
    """The old module(s) a new module's delta comes from; the highest-rank one sets rank and alpha."""
    spec = new.family.modules[new_name]
    roles = ("q", "k", "v") if spec.role == "qkv" else (spec.role,)
    candidates = []
    for i in sources:
        for role in roles:
            found = old.family.module_for_canonical_role(role)
            if found is not None and (i, found[0].name) in adapter.factors:
                candidates.append(adapter.factors[(i, found[0].name)])
    return max(candidates, key=lambda f: f.rank)


def layer_unit_maps(old, new, analysis: PairAnalysis, i: int, j: int, mode: str, roles=None,
                    maps: dict[str, torch.Tensor] | None = None) -> dict[str, RoleMap]:
    """The unit maps of old layer i -> new layer j (unit_maps.role_maps): of ``roles``, default every role both
    layers have.  Adapter-independent: the pipeline's ``unit_maps`` stage computes them once per model pair."""
    maps = maps if maps is not None else pair_maps(old, new, analysis, i, j)
    return role_maps(layer_weights(old, i), layer_weights(new, j), old.dims, new.dims, maps, analysis.matches[i],
                     mode, analysis.residual.P, roles)


def transfer_layer_pair(old, new, analysis: PairAnalysis, adapter: LoraAdapter, i: int, j: int, mode: str,
                        unit_maps: dict[str, RoleMap] | None = None):
    """Canonical new deltas (factor form) for old layer i -> new layer j, with fit diagnostics; for a
    DoRA adapter also the carried effective changes 𝒯(E) per canonical role (dense), else {}.
    ``unit_maps``: this pair's maps (:func:`layer_unit_maps`, e.g. loaded from the store); None computes
    the ones the adapter needs here (the direct path, equal bit for bit)."""
    deltas = canonical_factors(old.family, old.dims, _layer_deltas(adapter, i))
    if not deltas:
        return {}, {}, {}, set(), {}
    maps = pair_maps(old, new, analysis, i, j)
    if unit_maps is None:
        unit_maps = layer_unit_maps(old, new, analysis, i, j, mode, list(deltas), maps)
    transfer = CarriedLayer(unit_maps, maps, mode, analysis.residual.P)
    carried = transfer.run(deltas)
    fit = dict(transfer.fit)
    changes = {}
    if adapter.variant.has_magnitude:
        changes = {role: carry_dense(transfer, role, E) for role, E in _dora_changes(old, adapter, i).items()
                   if role in transfer.roles}
    offsets = _offset_effects(old, new, deltas, maps, i, j)
    return carried, fit, offsets, set(deltas), changes


def _dora_changes(old: LoadedModel, adapter: LoraAdapter, i: int) -> dict[str, torch.Tensor]:
    """{canonical role: E = W'_old − W_old} of old layer i (dora.py)."""
    changes = {}
    for (layer, name), f in adapter.factors.items():
        if layer == i:
            W = old.layer_weight(i, old.family.modules[name].path)
            changes[name] = effective_change(W, f.delta(), f.magnitude)
    return canonical_deltas(old.family, old.dims, changes)


def _offset_effects(old, new, deltas: dict[str, LowRank], maps, i, j) -> dict[str, float]:
    """Size of ΔW·c relative to ΔW for the LayerNorm offset a bias-free LoRA cannot carry."""
    effects = {}
    for norm_role, roles in (("attention_input", ("q", "k", "v")), ("mlp_input", ("gate", "up"))):
        c = input_offset(maps[norm_role], old.norm_bias(i, norm_role), new.norm_bias(j, norm_role))
        if c is None:
            continue
        for role in roles:
            norm = deltas[role].norm() if role in deltas else 0.0
            if norm > 0:
                effects[role] = float(deltas[role].apply(c.double()).norm()) / norm
    return effects


def sources_by_new_layer(mapping: list[tuple[int, int]], adapter_layers: set[int]) -> dict[int, list[int]]:
    """new layer -> the old layers (holding adapter weights) mapped onto it."""
    sources: dict[int, list[int]] = defaultdict(list)
    for i, j in mapping:
        if i in adapter_layers:
            sources[j].append(i)
    return dict(sources)


@dataclass
class NewLayerResult:
    modules: list[MigratedModule]
    unit_fit: dict[str, float]
    input_offsets: dict[str, float]
    roles: set[str]


def transfer_new_layer(old, new, analysis: PairAnalysis, adapter: LoraAdapter, j: int, sources: list[int],
                       mode: str, unit_maps: dict[int, dict[str, RoleMap]] | None = None) -> NewLayerResult:
    """The unit of per-layer work: carry every old layer mapped onto new layer j, sum, re-factorise.
    ``unit_maps``: old layer -> its maps onto j (:func:`layer_unit_maps` in ``mode``); None: computed here."""
    summed: dict[str, LowRank] = {}
    changes: dict[str, torch.Tensor] = {}
    unit_fit: dict[str, float] = {}
    offsets: dict[str, float] = {}
    roles: set[str] = set()
    for i in sources:
        carried, fit, off, old_roles, carried_changes = transfer_layer_pair(old, new, analysis, adapter, i, j, mode,
                                                                             None if unit_maps is None else unit_maps[i])
        roles |= old_roles
        for role, delta in carried.items():
            summed[role] = summed[role] + delta if role in summed else delta
        for role, E in carried_changes.items():
            changes[role] = changes[role] + E if role in changes else E
        unit_fit.update({f"{i}->{j}.{role}": v for role, v in fit.items()})
        offsets.update({f"{i}->{j}.{role}": v for role, v in off.items()})
    module_changes = module_deltas(new.family, new.dims, changes)
    modules = []
    for name, delta in sorted(module_factors(new.family, new.dims, summed).items()):
        source = _source_factors(old, new, adapter, name, sources)
        factors = refactorise(delta, source.rank, source.scaling, singular_values=adapter.variant.svd_form)
        module = MigratedModule(j, name, factors, source.rank, source.alpha, sources)
        if adapter.variant.has_magnitude:
            W = new.layer_weight(j, new.family.modules[name].path)
            fit = fit_magnitude(W, factors.delta(source.scaling), W + module_changes[name],
                                new.family.module_key(j, name))
            module.magnitude, module.magnitude_fit = fit.magnitude, fit.report()
        modules.append(module)
    return NewLayerResult(modules, unit_fit, offsets, roles)


def combine_layers(new: LoadedModel, results: list[NewLayerResult], *, zero_init_unmapped: bool = False,
                   seed: int = 0) -> MigratedAdapter:
    """The per-layer results as one adapter; with ``zero_init_unmapped`` every new layer left without
    modules gets zero-delta modules (module docstring), listed in ``zero_init_layers``."""
    modules = [m for r in results for m in r.modules]
    unit_fit = {k: v for r in results for k, v in r.unit_fit.items()}
    offsets = {k: v for r in results for k, v in r.input_offsets.items()}
    dropped = dropped_roles(new.family, {role for r in results for role in r.roles})
    extra = zero_init_modules(new, modules, seed) if zero_init_unmapped else []
    zero_layers = sorted({m.layer for m in extra})
    modules = sorted(modules + extra, key=lambda m: (m.layer, m.name))
    return MigratedAdapter(modules, unit_fit, dropped, offsets, zero_layers)


def _most_common(values):
    return max(sorted(set(values)), key=values.count)


def zero_init_modules(new: LoadedModel, modules: list[MigratedModule], seed: int = 0,
                      covered: Iterable[int] | None = None) -> list[MigratedModule]:
    """Zero-delta modules (the adapter's targets, most common rank and alpha) on every new layer
    without a migrated module (``covered``: the layers to leave out instead; ``()``: a fresh adapter on
    every layer), initialised as PEFT initialises a fresh module of the variant."""
    if not modules:
        return []
    covered = {m.layer for m in modules} if covered is None else set(covered)
    names = sorted({m.name for m in modules})
    rank, alpha = _most_common([m.rank for m in modules]), _most_common([m.alpha for m in modules])
    adalora = any(m.factors.E is not None for m in modules)
    dora = any(m.magnitude is not None for m in modules)
    g = torch.Generator().manual_seed(seed)
    extra = []
    for j in range(new.dims.num_layers):
        if j in covered:
            continue
        for name in names:
            out_dim, in_dim = expected_shape(new.family, new.dims, new.family.modules[name].role)
            A, B = torch.empty(rank, in_dim), torch.empty(out_dim, rank)
            E = None
            if adalora:
                torch.nn.init.normal_(A, 0.0, 0.02, generator=g)
                torch.nn.init.normal_(B, 0.0, 0.02, generator=g)
                E = torch.zeros(rank, 1)
            else:
                torch.nn.init.kaiming_uniform_(A, a=5 ** 0.5, generator=g)
                B.zero_()
            module = MigratedModule(j, name, Refactorised(A=A, B=B, residual=0.0, E=E), rank, alpha, [])
            if dora:
                norms = torch.linalg.vector_norm(new.layer_weight(j, new.family.modules[name].path), dim=1)
                if not bool((norms > 0).all()):      # PEFT's DoRA would divide 0 by 0 (e.g. a zero-output layer)
                    log.warning("no zero-initialised DoRA module on layer %d %s: its weight has all-zero rows", j, name)
                    continue
                module.magnitude = norms.float()
                module.magnitude_fit = {"relative_to_weight": 0.0, "relative_to_change": 0.0}
            extra.append(module)
    return extra


# ----------------------------------------------------------------------------- writing
