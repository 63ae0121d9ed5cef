"""The pair-analysis stages: computed once per model pair and calibration set, shared by every adapter.

``vocabulary`` (shared tokens), ``transfer_matrix`` (residual maps), ``activations`` (paired hidden
states on the calibration text), ``cka``, ``layer_mapping``, ``head_similarity`` (head and neuron
matching of every mapped layer pair; writes the whole pair analysis) and ``unit_maps`` (per mapped
layer pair and role the unit maps M and their fit, :mod:`lorasuite_core.transfer.unit_maps`, in the
plan's ``head_transform`` mode; :mod:`.unit_map_store`).  Their inputs and order:
:data:`lorasuite_core.pipeline.graph.PAIR_GRAPH`.  Each is a function ``(store, plan, *input_uris)``
over the :class:`~lorasuite_core.pipeline.stage_store.StageStore`; arrays live in safetensors files of
the entries.  :func:`pair_analysis` reads the finished analysis back (memoised per process).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file

from lorasuite_core.io import terminal
from lorasuite_core.io.uris import redact_uri
from lorasuite_core.transfer.activation_fit import FITS, fit_mapped_pairs, load_fits, save_fits
from lorasuite_core.transfer.activations import PairedActivations, paired_activations
from lorasuite_core.pipeline.analysis_store import load_matches, save_matches
from lorasuite_core.pipeline.unit_map_store import clear_memo as clear_unit_maps, save_unit_maps
from lorasuite_core.transfer.cka import minibatch_cka
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.transfer.layer_mapping import fixed_mapping, map_layers
from lorasuite_core.report.migration import head_mapping_entries
from lorasuite_core.transfer.adapter import (PairAnalysis, effective_head_mapping, layer_unit_maps, match_layer_pair,
                                           pair_maps)
from lorasuite_core.transfer.residual import ResidualTransfer, residual_transfer
from lorasuite_core.pipeline.stage_store import StageResult, StageStore, texts_identity
from lorasuite_core.transfer.vocab import SharedVocabulary, shared_vocabulary

from lorasuite_core.pipeline.plans import PairPlan, _adapter, _model, calibration_texts

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _analysis(root: str, analysis_uri: str, vocabulary_uri: str, transfer_uri: str, cka_uri: str) -> PairAnalysis:
    store = StageStore.at(root)
    matrices = _load_numpy(store, cka_uri, "cka.safetensors")
    facts = store.facts(analysis_uri)
    return PairAnalysis(_load_vocabulary(store, vocabulary_uri), _load_transfer(store, transfer_uri),
                        matrices["cka_updates"], matrices["cka_states"],
                        [(int(i), int(j)) for i, j in facts["layer_mapping"]],
                        load_matches(store.local_dir(analysis_uri)), calibration=facts["calibration"],
                        activation_fits=_activation_fits(store.local_dir(analysis_uri)))


def _activation_fits(directory: Path) -> dict:
    """transfer_fit "activations": the fits stored beside the matches (none for "weights")."""
    return load_fits(directory / FITS) if (directory / FITS).is_file() else {}


def pair_analysis(store: StageStore, plan: PairPlan, analysis_uri: str) -> PairAnalysis:
    """The pair's analysis from the entries that hold it (each array once; see analysis_store)."""
    where = {stage: store.location(stage, plan.stage_keys[stage]) for stage in ("vocabulary", "transfer_matrix", "cka")}
    return _analysis(store.root, analysis_uri, where["vocabulary"], where["transfer_matrix"], where["cka"])


def clear_memo() -> None:
    """Forget memoised models, adapters and analyses (tests, long-lived workers)."""
    for cached in (_model, _adapter, _analysis):
        cached.cache_clear()
    clear_unit_maps()


def _load_vocabulary(store: StageStore, uri: str) -> SharedVocabulary:
    arrays = load_file(store.local_dir(uri) / "vocabulary.safetensors")
    return SharedVocabulary(arrays["old_ids"].numpy(), arrays["new_ids"].numpy())


def _load_transfer(store: StageStore, uri: str) -> ResidualTransfer:
    arrays = load_file(store.local_dir(uri) / "transfer_matrix.safetensors")
    facts = store.facts(uri)
    return ResidualTransfer(arrays["P"], arrays["Q"], facts["scale"], facts["fit_residual_old"], facts["fit_residual_new"])


def _load_numpy(store: StageStore, uri: str, name: str) -> dict[str, np.ndarray]:
    return load_numpy(store.local_dir(uri) / name)


def vocabulary(store: StageStore, plan: PairPlan) -> StageResult:
    def compute(out: Path) -> dict:
        shared = shared_vocabulary(plan.old().tokenizer(), plan.new().tokenizer())
        save_file({"old_ids": torch.from_numpy(shared.old_ids), "new_ids": torch.from_numpy(shared.new_ids)},
                  out / "vocabulary.safetensors")
        return {"shared_vocabulary_size": len(shared)}

    return store.run("vocabulary", plan.stage_keys["vocabulary"], compute)


def transfer_matrix(store: StageStore, plan: PairPlan, vocabulary_uri: str) -> StageResult:
    def compute(out: Path) -> dict:
        rt = residual_transfer(plan.old(), plan.new(), _load_vocabulary(store, vocabulary_uri))
        save_file({"P": rt.P.contiguous(), "Q": rt.Q.contiguous()}, out / "transfer_matrix.safetensors")
        return {"scale": rt.scale, "fit_residual_old": rt.fit_residual_old, "fit_residual_new": rt.fit_residual_new}

    return store.run("transfer_matrix", plan.stage_keys["transfer_matrix"], compute)


def activations(store: StageStore, plan: PairPlan) -> StageResult:
    def compute(out: Path) -> dict:
        texts = calibration_texts(plan.calibration_data, plan.max_calibration_tokens)
        if texts_identity(texts) != plan.calibration_identity:
            raise LorasuiteError(f"calibration data {plan.calibration_data} changed during the run; rerun")
        acts = paired_activations(plan.old(), plan.new(), texts, max_tokens=plan.max_calibration_tokens,
                                  progress=False,
                                  compute_dtype=torch.bfloat16 if plan.activations_dtype == "bfloat16" else None)
        for which, model, states in (("old", plan.old(), acts.old_states), ("new", plan.new(), acts.new_states)):
            if not np.isfinite(states).all():
                for name in model.weights.shard_of:   # name the culprit: get() refuses a non-finite weight
                    model.weights.get(name)
                raise LorasuiteError(f"{which} model {redact_uri(model.source)} gives NaN or Inf hidden "
                                     "states on the calibration text")
        save_numpy({"old_states": np.ascontiguousarray(acts.old_states),
                    "new_states": np.ascontiguousarray(acts.new_states)}, out / "activations.safetensors")
        return {"texts": acts.num_texts, "paired_tokens": acts.num_tokens, "compute_dtype": plan.activations_dtype}

    return store.run("activations", plan.stage_keys["activations"], compute)


def cka(store: StageStore, plan: PairPlan, activations_uri: str) -> StageResult:
    def compute(out: Path) -> dict:
        states = _load_numpy(store, activations_uri, "activations.safetensors")
        old, new = states["old_states"], states["new_states"]
        updates = minibatch_cka(PairedActivations.updates(old), PairedActivations.updates(new))
        hidden = minibatch_cka(old, new)
        save_numpy({"cka_updates": np.ascontiguousarray(updates), "cka_states": np.ascontiguousarray(hidden)},
                   out / "cka.safetensors")
        return {"shape": list(updates.shape)}

    return store.run("cka", plan.stage_keys["cka"], compute)


def cka_of_updates(store: StageStore, cka_uri: str) -> np.ndarray:
    """The L_old x L_new CKA of layer updates, from the cka entry (for reports and artifacts)."""
    return _load_numpy(store, cka_uri, "cka.safetensors")["cka_updates"]


def layer_mapping(store: StageStore, plan: PairPlan, cka_uri: str) -> StageResult:
    def compute(out: Path) -> dict:
        updates = _load_numpy(store, cka_uri, "cka.safetensors")["cka_updates"]
        method = plan.analysis.layer_mapping
        mapping = map_layers(updates, plan.layer_offset) if method == "cka" else fixed_mapping(*updates.shape, method)
        return {"layer_mapping": [[i, j] for i, j in mapping]}

    return store.run("layer_mapping", plan.stage_keys["layer_mapping"], compute)


def head_similarity(store: StageStore, plan: PairPlan, vocabulary_uri: str, transfer_uri: str,
                    activations_uri: str, cka_uri: str, mapping_uri: str) -> StageResult:
    """Match heads and neurons of every mapped layer pair; store the complete PairAnalysis."""

    def compute(out: Path) -> dict:
        old, new = plan.old(), plan.new()
        rt = _load_transfer(store, transfer_uri)
        matrices = _load_numpy(store, cka_uri, "cka.safetensors")
        mapping = [(int(i), int(j)) for i, j in store.facts(mapping_uri)["layer_mapping"]]
        analysis = PairAnalysis(_load_vocabulary(store, vocabulary_uri), rt, matrices["cka_updates"],
                                matrices["cka_states"], mapping, calibration=store.facts(activations_uri))
        heads_used = effective_head_mapping(old, new, plan.analysis.head_mapping)
        if heads_used != plan.analysis.head_mapping:
            log.info("head mapping %s -> %s: the %s family fixes each head's index (%s)", plan.analysis.head_mapping,
                     heads_used, (old if old.family.head_index_fixed else new).family.name,
                     (old if old.family.head_index_fixed else new).family.position_encoding)
        fit_facts = {}
        if plan.analysis.transfer_fit == "activations":        # activation_fit.py: maps per mapped pair
            states = _load_numpy(store, activations_uri, "activations.safetensors")
            analysis.activation_fits = fit_mapped_pairs(old, new, states["old_states"], states["new_states"], mapping)
            fit_facts = {"transfer_fit": {"fit": "activations", "layers": save_fits(analysis.activation_fits,
                                                                                    out / FITS)}}
        for done, (i, j) in enumerate(mapping, start=1):
            analysis.matches[i] = match_layer_pair(old, new, rt, i, j, plan.analysis.head_mapping,
                                                   pair_maps(old, new, analysis, i, j))
            terminal.advanced("head_similarity", done, len(mapping), "layer pairs")
        save_matches(analysis.matches, out)
        return {**fit_facts, "layer_mapping": [[i, j] for i, j in mapping], "head_mapping": head_mapping_entries(analysis),
                "shared_vocabulary_size": len(analysis.shared), "calibration": analysis.calibration}

    return store.run("head_similarity", plan.stage_keys["head_similarity"], compute)


def unit_maps(store: StageStore, plan: PairPlan, analysis_uri: str) -> StageResult:
    """The unit maps of every mapped layer pair and role, in ``plan.head_transform`` mode (adapter-independent:
    each adapter's layer jobs only apply them to its factors)."""

    def compute(out: Path) -> dict:
        old, new = plan.old(), plan.new()
        analysis = pair_analysis(store, plan, analysis_uri)
        maps, fit = {}, {}
        for done, (i, j) in enumerate(analysis.layer_mapping, start=1):
            maps[(i, j)] = layer_unit_maps(old, new, analysis, i, j, plan.head_transform)
            fit.update({f"{i}->{j}.{role}": m.fit for role, m in maps[(i, j)].items()})
            terminal.advanced("unit_maps", done, len(analysis.layer_mapping), "layer pairs")
        save_unit_maps(maps, plan.head_transform, out)
        return {"mode": plan.head_transform, "layer_pairs": len(maps), "max_fit": max(fit.values(), default=0.0)}

    return store.run("unit_maps", plan.stage_keys["unit_maps"], compute)
