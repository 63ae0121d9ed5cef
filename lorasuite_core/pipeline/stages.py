"""Migration stages as plain functions over references and store entries (wrapped by ``tasks/``).

Design
------
The sequential :func:`lorasuite_core.transfer.adapter.migrate` is cut into stages whose inputs and
outputs are *references* — model/adapter/data paths or URIs and entries of a
:class:`~lorasuite_core.pipeline.stage_store.StageStore` — so that each stage can run as its own job,
on any worker, and be reused when its entry already exists.  Arrays live in the entries'
files (safetensors); stages exchange only :class:`~lorasuite_core.pipeline.stage_store.StageResult`
(URI + small facts).  Never imports Prefect.

Pair analysis (adapter-independent; computed once per model pair and calibration set)::

    plan_pair        identities of both models and of the calibration text; every stage key
    vocabulary       (old, new)                         shared token ids
    transfer_matrix  (vocabulary)                       residual maps P, Q
    activations      (old, new, calibration, budget)    paired hidden states
    cka              (activations)                      CKA of layer updates and of states
    layer_mapping    (cka, offset)                      monotone old -> new layer map
    head_similarity  (transfer_matrix, layer_mapping)   head/neuron matching of every mapped pair;
                                                        writes the whole PairAnalysis (analysis_store)

Per adapter::

    plan_adapter     load + fit check, adapter identity, the per-new-layer jobs and every key
    transfer_layer   (analysis, adapter, new layer, sources, mode)   one NewLayerResult  [fan-out unit]
    assemble         (analysis, adapter, mode, refs)    PEFT directory + migration_report.json
    light_finetune   (migrated, data, hyper-parameters) LFT of the migrated adapter      [optional]
    vanilla_baseline (new model, data, hyper-parameters) fresh LoRA for comparison       [optional]
    evaluate         (model, adapter entry, data, n)    accuracy                         [optional]
    publish          not stored: copy to the output, report patched, completion manifest last

Keys (:func:`~lorasuite_core.pipeline.stage_store.stage_key`) chain: a stage's key includes the keys
of the entries it reads, so an adapter produced from reused entries is bit-identical to one
computed afresh.  There is one stage graph: the Prefect flows (``flows/pipeline.py``) submit
these functions as tasks, and :func:`migrate_in_process` — used by the synthetic demo, the
benchmark's timed transfer and the tests' references — calls the same functions in the same
order over the same store, without Prefect.  Loaded models, adapters and analyses are
memoised per process by identity, because a worker runs many per-layer jobs of one pair.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel as Schema  # the stage plans' schema base
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file

from lorasuite_core.io import storage
from lorasuite_core.transfer.activations import PairedActivations, builtin_calibration_texts, paired_activations, read_calibration_file
from lorasuite_core.pipeline.analysis_store import load_matches, save_matches
from lorasuite_core.transfer.cka import minibatch_cka
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.transfer.layer_mapping import fixed_mapping, map_layers
from lorasuite_core.pipeline.layer_results import load_layer_result, save_layer_result
from lorasuite_core.models.loading import (ADALORA_INIT_R, LoadedModel, LoraAdapter, adapter_variant, load_base_model,
                                           load_lora_adapter, resolve_local_dir)
from lorasuite_core.transfer.adapter import (REPORT_NAME, PairAnalysis, adapter_config, adapter_tensors,
                      build_report, check_adapter_fits, effective_head_mapping, head_mapping_entries, combine_layers, match_layer_pair, sources_by_new_layer,
                      transfer_new_layer, write_adapter_dir)
from lorasuite_core.transfer.residual import ResidualTransfer, residual_transfer
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.stage_store import (ADAPTER_PATTERNS, StageResult, StageStore, artifact_identity, data_identity,
                          default_store_root, stage_key, texts_identity)
from lorasuite_core.transfer.vocab import SharedVocabulary, shared_vocabulary

log = logging.getLogger(__name__)

#: The pair-analysis graph, declared once: each stage and the stages whose entries it reads, in
#: a topological order.  A stage function takes ``(store, plan, *upstream_uris)`` in this order;
#: :func:`migrate_in_process` calls them and the flows submit their tasks from this table.
PAIR_GRAPH: dict[str, tuple[str, ...]] = {
    "vocabulary": (),
    "activations": (),
    "transfer_matrix": ("vocabulary",),
    "cka": ("activations",),
    "layer_mapping": ("cka",),
    "head_similarity": ("vocabulary", "transfer_matrix", "activations", "cka", "layer_mapping"),
}
PAIR_STAGES = tuple(PAIR_GRAPH)
#: The per-adapter waves, in order (the flows run each wave for all entries before the next).
ENTRY_WAVES = ("load", "transfer", "write", "train", "gate", "eval", "publish")
PUBLISHED_EXTRA = ("training_summary.json",)


# --------------------------------------------------------------------------- memoised loading


@lru_cache(maxsize=8)
def _model(ref: str, identity: str) -> LoadedModel:
    return load_base_model(ref)


@lru_cache(maxsize=16)
def _adapter(ref: str, identity: str, old_ref: str, old_identity: str) -> LoraAdapter:
    try:
        return load_lora_adapter(ref, _model(old_ref, old_identity).family)
    except FileNotFoundError:
        raise LorasuiteError(f"adapter {storage.redact_uri(ref)} does not exist") from None


@lru_cache(maxsize=4)
def _analysis(root: str, analysis_uri: str, vocabulary_uri: str, transfer_uri: str, cka_uri: str) -> PairAnalysis:
    store = StageStore.at(root)
    matrices = _load_numpy(store, cka_uri, "cka.safetensors")
    facts = store.facts(analysis_uri)
    return PairAnalysis(_load_vocabulary(store, vocabulary_uri), _load_transfer(store, transfer_uri),
                        matrices["cka_updates"], matrices["cka_states"],
                        [(int(i), int(j)) for i, j in facts["layer_mapping"]],
                        load_matches(store.local_dir(analysis_uri)), calibration=facts["calibration"])


def pair_analysis(store: StageStore, plan: PairPlan, analysis_uri: str) -> PairAnalysis:
    """The pair's analysis from the entries that hold it (each array once; see analysis_store)."""
    where = {stage: store.location(stage, plan.stage_keys[stage]) for stage in ("vocabulary", "transfer_matrix", "cka")}
    return _analysis(store.root, analysis_uri, where["vocabulary"], where["transfer_matrix"], where["cka"])


def clear_memo() -> None:
    """Forget memoised models, adapters and analyses (tests, long-lived workers)."""
    for cached in (_model, _adapter, _analysis):
        cached.cache_clear()


# --------------------------------------------------------------------------- pair analysis


class PairPlan(Schema):
    """Both models, the calibration set and the key of every pair-analysis stage."""

    old_model: str
    new_model: str
    old_identity: str
    new_identity: str
    analysis: AnalysisOptions
    calibration_identity: str
    stage_keys: dict[str, str]

    @property
    def calibration_data(self) -> str | None:
        return self.analysis.calibration_data

    @property
    def max_calibration_tokens(self) -> int:
        return self.analysis.max_calibration_tokens

    @property
    def layer_offset(self) -> int | None:
        return self.analysis.layer_offset

    def old(self) -> LoadedModel:
        return _model(self.old_model, self.old_identity)

    def new(self) -> LoadedModel:
        return _model(self.new_model, self.new_identity)


def calibration_texts(ref: str | None, max_tokens: int) -> list[str]:
    """The calibration samples: read, streamed and capped for a budget of ``max_tokens`` paired tokens."""
    return read_calibration_file(ref, max_tokens) if ref else builtin_calibration_texts()


def plan_pair(old_model: str, new_model: str, analysis: AnalysisOptions | None = None) -> PairPlan:
    """Identify both models (file listings, not tensors) and the calibration text; derive the keys."""
    analysis = analysis or AnalysisOptions()
    calibration_data, max_calibration_tokens = analysis.calibration_data, analysis.max_calibration_tokens
    layer_offset = analysis.layer_offset
    old_id = artifact_identity(old_model, "model")
    new_id = artifact_identity(new_model, "model")
    calibration = texts_identity(calibration_texts(calibration_data, max_calibration_tokens))
    keys = {"vocabulary": stage_key("vocabulary", old=old_id, new=new_id)}
    keys["transfer_matrix"] = stage_key("transfer_matrix", vocabulary=keys["vocabulary"])
    keys["activations"] = stage_key("activations", old=old_id, new=new_id, calibration=calibration,
                                    max_tokens=max_calibration_tokens)
    keys["cka"] = stage_key("cka", activations=keys["activations"])
    keys["layer_mapping"] = stage_key("layer_mapping", cka=keys["cka"], offset=layer_offset,
                                      method=analysis.layer_mapping)
    keys["head_similarity"] = stage_key("head_similarity", transfer_matrix=keys["transfer_matrix"],
                                        layer_mapping=keys["layer_mapping"], activations=keys["activations"],
                                        layout="matches", heads=analysis.head_mapping)
    return PairPlan(old_model=old_model, new_model=new_model, old_identity=old_id, new_identity=new_id,
                    analysis=analysis, calibration_identity=calibration, stage_keys=keys)


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
                                  progress=False)
        for which, model, states in (("old", plan.old(), acts.old_states), ("new", plan.new(), acts.new_states)):
            if not np.isfinite(states).all():
                for name in model.weights.shard_of:   # name the culprit: get() refuses a non-finite weight
                    model.weights.get(name)
                raise LorasuiteError(f"{which} model {storage.redact_uri(model.source)} gives NaN or Inf hidden "
                                     "states on the calibration text")
        save_numpy({"old_states": np.ascontiguousarray(acts.old_states),
                    "new_states": np.ascontiguousarray(acts.new_states)}, out / "activations.safetensors")
        return {"texts": acts.num_texts, "paired_tokens": acts.num_tokens}

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
        for i, j in mapping:
            analysis.matches[i] = match_layer_pair(old, new, rt, i, j, plan.analysis.head_mapping)
        save_matches(analysis.matches, out)
        return {"layer_mapping": [[i, j] for i, j in mapping], "head_mapping": head_mapping_entries(analysis),
                "shared_vocabulary_size": len(analysis.shared), "calibration": analysis.calibration}

    return store.run("head_similarity", plan.stage_keys["head_similarity"], compute)


# --------------------------------------------------------------------------- per adapter: plan


class LayerJob(Schema):
    new_layer: int
    sources: list[int]
    key: str


class TrainJob(Schema):
    key: str
    data: str | None
    samples: int
    lr: float
    epochs: int
    seed: int
    rank: int = 0
    alpha: float = 0.0
    targets: list[str] = []
    use_dora: bool = False


class EvalJob(Schema):
    """One row of the evaluation table: a model with (or without) one adapter."""

    row: str
    model: Literal["old", "new"]
    adapter: Literal["source", "migrated", "lft", "vanilla"] | None
    key: str

    @property
    def label(self) -> str:
        return f"{self.model}-{self.adapter or 'bare'}"


class AdapterPlan(Schema):
    name: str
    adapter: str
    adapter_identity: str
    options: MigrationOptions
    modules: int
    layers: list[LayerJob]
    migrated_key: str
    lft: TrainJob | None = None
    vanilla: TrainJob | None = None
    gate_key: str | None = None          # the quality gate's entry, when the options ask for it
    evals: list[EvalJob] = []
    seconds: float = 0.0                 # time taken to load, check and plan


def output_status(output: str, inputs: dict[str, str | None]) -> Literal["empty", "complete", "partial", "foreign"]:
    """Refuse an output that would destroy an input; else the destination's state (see storage.output_state)."""
    storage.check_output_location(output, inputs)
    return storage.output_state(output)


def run_inputs(old_model: str, new_model: str, adapter: str, options: MigrationOptions,
               analysis: AnalysisOptions | None = None, cache_root: str | None = None) -> dict[str, str | None]:
    """Everything a migration reads, by name, for :func:`output_status`."""
    return {"old model": old_model, "new model": new_model, "adapter": adapter, "LFT data": options.lft_data,
            "LFT prompts": options.lft_prompts, "seed prompts": options.lft_seed_prompts,
            "evaluation data": options.eval_data,
            "calibration data": analysis.calibration_data if analysis else None,
            "cache root": cache_root or default_store_root()}


def check_adapter(old_model: str, adapter_ref: str) -> None:
    """Before any analysis: the adapter loads (LoRA, finite tensors, known targets) and fits the old model."""
    old_identity = artifact_identity(old_model, "model")
    identity = artifact_identity(adapter_ref, "adapter", ADAPTER_PATTERNS)
    check_adapter_fits(_adapter(adapter_ref, identity, old_model, old_identity), _model(old_model, old_identity))


def plan_adapter(plan: PairPlan, analysis: StageResult, name: str, adapter_ref: str,
                 options: MigrationOptions) -> AdapterPlan:
    """Load and check the adapter against the old model; list its per-layer jobs and every key."""
    start = time.perf_counter()
    old = plan.old()
    identity = artifact_identity(adapter_ref, "adapter", ADAPTER_PATTERNS)
    adapter = _adapter(adapter_ref, identity, plan.old_model, plan.old_identity)
    check_adapter_fits(adapter, old)
    mapping = [(int(i), int(j)) for i, j in analysis.facts["layer_mapping"]]
    sources = sources_by_new_layer(mapping, {layer for layer, _ in adapter.factors})
    mode = options.head_transform
    layers = [LayerJob(new_layer=j, sources=sources[j],
                       key=stage_key("layer", analysis=analysis.key, adapter=identity, new_layer=j,
                                     sources=sources[j], mode=mode))
              for j in sorted(sources)]
    zero_init = options.adds_zero_init
    migrated_key = stage_key("migrated", analysis=analysis.key, adapter=identity, mode=mode, layers=[l.key for l in layers],
                             refs=[plan.old_model, plan.new_model, adapter_ref], offset=plan.layer_offset,
                             **({"zero_init": True, "seed": options.seed} if zero_init else {}))
    lft = vanilla = None
    if options.runs_lft:
        data = data_identity(options.lft_data, "LFT data") if options.lft_data else None
        lft = TrainJob(key=stage_key("lft", migrated=migrated_key, model=plan.new_identity, data=data,
                                     samples=options.lft_samples, lr=options.lft_lr, epochs=options.lft_epochs,
                                     seed=options.seed, **_distill_key_parts(plan, identity, options)),
                       data=options.lft_data, samples=options.lft_samples, lr=options.lft_lr,
                       epochs=options.lft_epochs, seed=options.seed)
        if options.runs_vanilla:
            vanilla = _vanilla_job(plan, adapter, options, data)
    evals = _eval_jobs(plan, identity, migrated_key, lft, vanilla, options) if options.eval_data else []
    gate_key = None
    if options.gate:
        held_out = data_identity(options.eval_data, "evaluation data") if options.eval_data else "lft-heldout"
        gate_key = stage_key("gate", adapter=lft.key if lft else migrated_key, teacher=[plan.old_identity, identity],
                             heldout=held_out, n=options.gate_prompts, margin=options.gate_margin, seed=options.seed)
    return AdapterPlan(name=name, adapter=adapter_ref, adapter_identity=identity, options=options,
                       modules=len(adapter.factors), layers=layers, migrated_key=migrated_key,
                       lft=lft, vanilla=vanilla, gate_key=gate_key, evals=evals, seconds=time.perf_counter() - start)


def _distill_key_parts(plan: PairPlan, adapter_identity: str, options: MigrationOptions) -> dict[str, Any]:
    """What a distilled LFT depends on beyond labelled LFT: the teacher, the prompts, the KL weight, held-out set."""
    if options.lft_mode != "distill":
        return {}
    return {"lft_mode": "distill", "teacher": [plan.old_identity, adapter_identity],
            "prompts": data_identity(options.lft_prompts, "LFT prompts") if options.lft_prompts else None,
            "seeds": data_identity(options.lft_seed_prompts, "seed prompts") if options.lft_seed_prompts else None,
            **({"synthesis": SYNTHESIS_VERSION} if options.lft_seed_prompts else {}),
            "kl_weight": options.lft_kl_weight, "heldout_n": options.gate_prompts,
            "heldout": data_identity(options.eval_data, "evaluation data") if options.eval_data else None,
            "vocabulary": plan.stage_keys["vocabulary"]}


def _vanilla_job(plan: PairPlan, adapter: LoraAdapter, options: MigrationOptions, data: str) -> TrainJob:
    """The source adapter's kind, rank, alpha and targets: a DoRA source gets a fresh DoRA, an AdaLoRA
    source a fresh LoRA at its initial rank ``init_r`` (AdaLoRA's budget schedule is a function of the
    original run's step count, which the adapter does not record)."""
    variant = adapter_variant(adapter.config)
    rank = int(adapter.config.get("init_r", ADALORA_INIT_R) if variant == "adalora" else adapter.config.get("r", 8))
    alpha = float(adapter.config.get("lora_alpha", rank))
    targets = sorted(adapter.target_names)
    use_dora = variant == "dora"
    key = stage_key("vanilla", model=plan.new_identity, data=data, samples=options.lft_samples,
                    epochs=options.lft_epochs, seed=options.seed, rank=rank, alpha=alpha, targets=targets,
                    use_dora=use_dora)
    return TrainJob(key=key, data=options.lft_data, samples=options.lft_samples, lr=3e-4,
                    epochs=options.lft_epochs, seed=options.seed, rank=rank, alpha=alpha, targets=targets,
                    use_dora=use_dora)


def _eval_jobs(plan: PairPlan, adapter_identity: str, migrated_key: str, lft: TrainJob | None,
               vanilla: TrainJob | None, options: MigrationOptions) -> list[EvalJob]:
    data = data_identity(options.eval_data, "evaluation data")
    rows = [("old model + source adapter", "old", "source", plan.old_identity, adapter_identity),
            ("new model, no adapter", "new", None, plan.new_identity, None),
            ("new model + migrated (transfer)", "new", "migrated", plan.new_identity, migrated_key)]
    if lft:
        rows.append(("new model + migrated + LFT", "new", "lft", plan.new_identity, lft.key))
    if vanilla:
        rows.append(("new model + vanilla LoRA", "new", "vanilla", plan.new_identity, vanilla.key))
    from lorasuite_core.training.evaluation import eval_dtype
    from lorasuite_core.training.train import resolve_device

    dtype = eval_dtype("auto", resolve_device("auto"))      # bf16 where the CPU has it: part of the result
    return [EvalJob(row=row, model=model, adapter=kind,
                    key=stage_key("eval", model=model_id, adapter=adapter_key, data=data, n=options.eval_samples,
                                  seed=options.seed, generation="greedy-loop", dtype=dtype))
            for row, model, kind, model_id, adapter_key in rows]


# --------------------------------------------------------------------------- per adapter: work


def transfer_layer(store: StageStore, plan: PairPlan, analysis_uri: str, adapter: AdapterPlan,
                   job: LayerJob) -> StageResult:
    """The unit of per-layer work: carry every old layer mapped onto ``job.new_layer``, re-factorise."""

    def compute(out: Path) -> dict:
        old, new = plan.old(), plan.new()
        analysis = pair_analysis(store, plan, analysis_uri)
        source = _adapter(adapter.adapter, adapter.adapter_identity, plan.old_model, plan.old_identity)
        result = transfer_new_layer(old, new, analysis, source, job.new_layer, list(job.sources),
                                    adapter.options.head_transform)
        save_layer_result(result, out)
        return {"new_layer": job.new_layer, "modules": len(result.modules)}

    return store.run("layer", job.key, compute)


def assemble(store: StageStore, plan: PairPlan, analysis_uri: str, adapter: AdapterPlan,
             layer_uris: list[str]) -> StageResult:
    """Combine the per-layer results (in new-layer order) into a PEFT directory with its report."""

    def compute(out: Path) -> dict:
        start = time.perf_counter()
        old, new = plan.old(), plan.new()
        analysis = pair_analysis(store, plan, analysis_uri)
        source = _adapter(adapter.adapter, adapter.adapter_identity, plan.old_model, plan.old_identity)
        migrated = combine_layers(new, [load_layer_result(store.local_dir(uri)) for uri in layer_uris],
                                  zero_init_unmapped=adapter.options.adds_zero_init, seed=adapter.options.seed)
        config = adapter_config(source.config, new, migrated)
        tensors = adapter_tensors(new, migrated)
        steps = {"write": {"cache": "computed", "seconds": round(time.perf_counter() - start, 4)}}
        report = build_report(old, new, source, analysis, migrated, adapter.options.head_transform,
                              plan.layer_offset, steps)
        # differs from options.head_mapping where a family fixes each head's index (ALiBi)
        report["head_mapping_used"] = effective_head_mapping(old, new, plan.analysis.head_mapping)
        write_adapter_dir(out, config, tensors, report, overwrite=True)
        return {"modules": len(migrated.modules), "dropped_roles": migrated.dropped,
                "zero_initialised_layers": list(migrated.zero_init_layers),
                "max_refactorisation_residual": max((m.factors.residual for m in migrated.modules), default=0.0)}

    return store.run("migrated", adapter.migrated_key, compute)


def load_samples(ref: str | None, limit: int | None, split: Literal["train", "test"], seed: int = 0) -> list:
    """math_10k-layout samples from a local/remote JSON(L) file, or generated problems for None."""
    from lorasuite_core.training.samples import load_samples as load

    return load(ref, limit, split=split, seed=seed)


def _restore_base_reference(adapter_dir: Path, base_model: str) -> None:
    """PEFT writes the local model directory it trained on; point the adapter back at the model's reference."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)


def light_finetune(store: StageStore, plan: PairPlan, adapter: AdapterPlan, migrated_uri: str) -> StageResult:
    """LFT of the migrated adapter on the new model: labelled (lorasuite_core.training.train.light_finetune)
    or distilled from the teacher, the old model + the old adapter (lorasuite_core.training.distill)."""
    from lorasuite_core.training.train import default_lft_config, light_finetune as run_lft

    job = adapter.lft

    def compute(out: Path) -> dict:
        migrated = store.local_dir(migrated_uri)
        config = default_lft_config(lr=job.lr, epochs=job.epochs, seed=job.seed, show_progress=False)
        if adapter.options.lft_mode == "distill":
            facts = _distill(store, plan, adapter, migrated, out, config)
        else:
            samples = load_samples(job.data, job.samples, "train", job.seed)
            facts = _train_facts(run_lft(resolve_local_dir(plan.new_model, "model"), migrated, samples, out,
                                         config=config))
            facts["lft_mode"] = "labelled"
        _restore_base_reference(out, plan.new_model)
        shutil.copy2(migrated / REPORT_NAME, out / REPORT_NAME)
        return facts

    return store.run("lft", job.key, compute)


HELDOUT = "heldout_prompts.json"
#: Version of prompt synthesis in distilled LFT's stage key (2: the teacher's base model writes the prompts).
SYNTHESIS_VERSION = 2


def _prompts(ref: str, limit: int | None, seed: int) -> list:
    """Unlabelled prompts: a prompt file (.txt / .jsonl / .json, math_10k records included), builtin:<split> or a
    task: spec."""
    from lorasuite_core.training import distill as D
    from lorasuite_core.training.samples import BUILTIN
    from lorasuite_core.training.skills import TASK

    if ref.startswith((BUILTIN, TASK)):
        return D.prompts_from_samples(load_samples(ref, limit, "train", seed))
    return D.read_prompts(ref, limit)


def _heldout_eval(options: MigrationOptions) -> tuple[list, list[str] | None]:
    """The evaluation data's first ``gate_prompts`` prompts and gold answers (empty without eval data)."""
    from lorasuite_core.training import distill as D

    if not options.eval_data:
        return [], None
    samples = load_samples(options.eval_data, options.gate_prompts, "test", options.seed)
    return D.prompts_from_samples(samples), [s.answer for s in samples]


def _distill(store: StageStore, plan: PairPlan, adapter: AdapterPlan, migrated: Path, out: Path, config) -> dict:
    from lorasuite_core.training import distill as D

    o = adapter.options
    teacher_dir = resolve_local_dir(plan.old_model, "model")
    source_dir = resolve_local_dir(adapter.adapter, "adapter")
    heldout, _ = _heldout_eval(o)
    wanted = o.lft_samples + (0 if heldout else o.gate_prompts)
    if o.lft_seed_prompts and not o.lft_prompts:
        model, tokenizer = D.load_for_generation(teacher_dir, dtype="float32")   # the writer: the teacher's base
        seeds = _prompts(o.lft_seed_prompts, None, o.seed)
        prompts = D.synthesise_prompts(model, tokenizer, seeds, wanted, seed=o.seed, exclude=[p.text for p in heldout])
        del model
        source = "synthesised"
    else:
        prompts, source = _prompts(o.lft_prompts or o.lft_data, wanted, o.seed), "file"
    if heldout:
        train = prompts[:o.lft_samples]
    else:
        if len(prompts) <= o.gate_prompts:
            raise LorasuiteError(f"distillation: {len(prompts)} prompts, but {o.gate_prompts} are held out "
                                 f"(--gate-prompts) and at least one must be left to train on")
        train, heldout = D.split_heldout(prompts, o.gate_prompts, o.seed)
    vocabulary = _load_vocabulary(store, store.location("vocabulary", plan.stage_keys["vocabulary"]))
    report = D.distill(teacher_dir, source_dir, resolve_local_dir(plan.new_model, "model"), migrated, out, train,
                       heldout=heldout, config=D.DistillConfig(kl_weight=o.lft_kl_weight, train=config),
                       shared_ids=(vocabulary.old_ids.tolist(), vocabulary.new_ids.tolist()), prompt_source=source)
    _write_heldout(out / HELDOUT, heldout, report.heldout_teacher, report.heldout_student)
    return {"lft_mode": "distill", **report.to_dict()}


def _write_heldout(path: Path, prompts: list, teacher: list, student: list) -> None:
    """Distillation's held-out prompts with the teacher's and the distilled student's greedy completions on them
    (generated as the gate generates them), so the gate only has the bare model left to generate."""
    as_dict = lambda c: {"text": c.text, "ids": list(c.ids)}
    path.write_text(json.dumps([{"instruction": p.instruction, "input": p.input, "teacher": as_dict(t),
                                 "student": as_dict(s)} for p, t, s in zip(prompts, teacher, student, strict=True)]))


def _read_heldout(path: Path) -> tuple[list, list | None, list | None]:
    """``(prompts, teacher completions, student completions)`` of :func:`_write_heldout` (completions None in a
    record written without them); a malformed file is a one-line error, not a traceback."""
    from lorasuite_core.training import distill as D

    def completion(record: dict, key: str):
        value = record.get(key)
        if value is None:
            return None
        if not (isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("ids"), list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in value["ids"])):
            raise ValueError(f"{key} is not a {{text, ids}} completion")
        return D.Completion(value["text"], tuple(value["ids"]))

    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not records:
            raise ValueError("not a non-empty list")
        prompts, teacher, student = [], [], []
        for record in records:
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                    or not isinstance(record.get("input", ""), str):
                raise ValueError("a record without a string instruction")
            prompts.append(D.Prompt(record["instruction"], record.get("input", "")))
            teacher.append(completion(record, "teacher"))
            student.append(completion(record, "student"))
    except (OSError, ValueError) as exc:
        raise LorasuiteError(f"distillation's held-out prompts {path}: {exc}") from None
    whole = lambda items: items if all(c is not None for c in items) else None
    return prompts, whole(teacher), whole(student)


def quality_gate(store: StageStore, plan: PairPlan, adapter: AdapterPlan, final_uri: str) -> StageResult:
    """Agreement with the teacher on held-out prompts, against the bare new model's; a failure raises
    :class:`~lorasuite_core.training.gate.QualityGateFailed` with the numbers (also when reused)."""
    from lorasuite_core.training import distill as D
    from lorasuite_core.training.gate import GateResult, check_gate, quality_gate as run_gate

    o = adapter.options

    def compute(out: Path) -> dict:
        final = store.local_dir(final_uri)
        prompts, answers = _heldout_eval(o)
        teacher_completions = student_completions = None
        if (final / HELDOUT).exists():   # a distilled adapter: its held-out prompts, already generated on
            stored_prompts, teacher_completions, student_completions = _read_heldout(final / HELDOUT)
            if prompts and stored_prompts != prompts:   # (the eval data's, when given: the same prompts)
                raise LorasuiteError(f"distillation's held-out prompts in {final} are not the evaluation data's "
                                     f"first {o.gate_prompts}")
            prompts = stored_prompts
        if not prompts:
            raise LorasuiteError("quality gate: no held-out prompts (no evaluation data and no distillation)")
        if teacher_completions is None:
            teacher, tokenizer = D.load_for_generation(resolve_local_dir(plan.old_model, "model"),
                                                       resolve_local_dir(adapter.adapter, "adapter"))
            teacher_completions = D.greedy_completions(teacher, tokenizer, prompts)
            del teacher
        result = run_gate(resolve_local_dir(plan.new_model, "model"), final, prompts, teacher_completions,
                          answers=answers, margin=o.gate_margin, student_completions=student_completions)
        return {**result.to_dict(), "reused_completions": student_completions is not None}

    stored = store.run("gate", adapter.gate_key, compute)
    check_gate(GateResult(**{k: stored.facts[k] for k in GateResult.__dataclass_fields__ if k in stored.facts}))
    return stored


def vanilla_baseline(store: StageStore, plan: PairPlan, adapter: AdapterPlan) -> StageResult:
    """A fresh LoRA (same kind, rank, alpha, targets, data and epochs: :func:`_vanilla_job`) trained on the new model."""
    from lorasuite_core.training.train import TrainConfig, train_lora

    job = adapter.vanilla

    def compute(out: Path) -> dict:
        samples = load_samples(job.data, job.samples, "train", job.seed)
        config = TrainConfig(lr=job.lr, epochs=job.epochs, seed=job.seed, show_progress=False)
        result = train_lora(resolve_local_dir(plan.new_model, "model"), samples, out, rank=job.rank,
                            alpha=job.alpha, targets=job.targets, config=config, use_dora=job.use_dora)
        _restore_base_reference(out, plan.new_model)
        return {**_train_facts(result), "kind": "dora" if job.use_dora else "lora", "rank": job.rank}

    return store.run("vanilla", job.key, compute)


def _train_facts(result) -> dict:
    facts = result.to_dict()
    facts.pop("out_dir", None)
    return facts


def evaluate(store: StageStore, plan: PairPlan, adapter: AdapterPlan, job: EvalJob,
             adapter_uri: str | None) -> StageResult:
    """Accuracy of one evaluation row (``adapter_uri``: the store entry of that row's adapter)."""
    from lorasuite_core.training.evaluation import evaluate as run_eval

    def compute(out: Path) -> dict:
        model = plan.old_model if job.model == "old" else plan.new_model
        if job.adapter == "source":
            adapter_dir = resolve_local_dir(adapter.adapter, "adapter")
        else:
            adapter_dir = store.local_dir(adapter_uri) if adapter_uri else None
        samples = load_samples(adapter.options.eval_data, adapter.options.eval_samples, "test", adapter.options.seed)
        result = run_eval(resolve_local_dir(model, "model"), samples, adapter_dir=adapter_dir,
                          show_progress=False, keep_predictions=False)
        return {"row": job.row, **result.to_dict()}

    return store.run("eval", job.key, compute)


# --------------------------------------------------------------------------- publish


def publish(store: StageStore, source_uri: str, output: str, report_updates: dict[str, Any], *,
            overwrite: bool = False) -> str:
    """Copy a finished adapter entry to ``output`` with its report updated; atomically, manifest last."""
    source = store.local_dir(source_uri)
    with tempfile.TemporaryDirectory(prefix="lorasuite-publish-") as tmp:
        staged = Path(tmp)
        for name in ("adapter_config.json", "adapter_model.safetensors", *PUBLISHED_EXTRA):
            if (source / name).is_file():
                shutil.copy2(source / name, staged / name)
        report = json.loads((source / REPORT_NAME).read_text())
        report.update(report_updates)
        (staged / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        return storage.publish_dir_atomic(staged, output, overwrite=overwrite)


# --------------------------------------------------------------------------- the graph, in process


def pair_stage_functions() -> dict[str, Any]:
    """Stage name -> function, for :data:`PAIR_GRAPH` (the tasks wrap exactly these)."""
    return {"vocabulary": vocabulary, "activations": activations, "transfer_matrix": transfer_matrix,
            "cka": cka, "layer_mapping": layer_mapping, "head_similarity": head_similarity}


def report_updates(plan: PairPlan, entry: AdapterPlan, stored: dict[str, StageResult],
                   evals: dict[str, dict[str, Any]], steps: dict[str, Any], store_root: str,
                   **pipeline: Any) -> dict[str, Any]:
    """What the published migration_report.json gets on top of the assembled report."""
    options = {**entry.options.model_dump(mode="json"), **plan.analysis.model_dump(mode="json")}
    updates: dict[str, Any] = {"steps": steps, "pipeline": {
        **pipeline, "stage_store": storage.redact_uri(store_root),
        "keys": {**plan.stage_keys, "migrated": entry.migrated_key}},
        "options": {k: storage.redact_uri(v) if isinstance(v, str) else v for k, v in options.items()}}
    if "lft" in stored:
        updates["light_finetune"] = {k: v for k, v in stored["lft"].facts.items() if k != "losses"}
    if "vanilla" in stored:
        updates["vanilla_baseline"] = {k: v for k, v in stored["vanilla"].facts.items() if k != "losses"}
    if "gate" in stored:
        updates["quality_gate"] = dict(stored["gate"].facts)
    if evals:
        updates["evaluation"] = {row: {k: f[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct")}
                                 for row, f in evals.items()}
    return updates


def migrate_in_process(old_model: str, new_model: str, adapter: str, output: str,
                       options: MigrationOptions | None = None, analysis: AnalysisOptions | None = None, *,
                       store_root: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the stage graph sequentially in this process (no Prefect) and publish to ``output``.

    The same functions, over the same store (``store_root``, default the configured stage
    store), in the order of :data:`PAIR_GRAPH` and :data:`ENTRY_WAVES` the flows use; returns
    the published report.
    """
    options = (options or MigrationOptions()).check_single()
    analysis = analysis or AnalysisOptions()
    old_model, new_model, adapter, output = map(str, (old_model, new_model, adapter, output))
    storage.check_replaceable(output, output_status(output, run_inputs(
        old_model, new_model, adapter, options, analysis, store_root)), overwrite)
    check_adapter(old_model, adapter)
    store = StageStore.at(store_root)
    plan = plan_pair(old_model, new_model, analysis)
    functions = pair_stage_functions()
    r: dict[str, StageResult] = {}
    for stage, upstream in PAIR_GRAPH.items():
        r[stage] = functions[stage](store, plan, *(r[u].uri for u in upstream))
    steps: dict[str, Any] = {}
    stored: dict[str, StageResult] = {}
    evals: dict[str, dict[str, Any]] = {}
    entry: AdapterPlan | None = None
    for wave in ENTRY_WAVES:
        if wave == "load":
            entry = plan_adapter(plan, r["head_similarity"], Path(output).name or "adapter", adapter, options)
            steps["load"] = {"cache": "computed", "seconds": round(entry.seconds, 4)}
            steps.update({stage: _step(r[stage]) for stage in PAIR_STAGES})
        elif wave == "transfer":
            layers = [transfer_layer(store, plan, r["head_similarity"].uri, entry, job) for job in entry.layers]
            steps["transfer"] = _step(*layers)
        elif wave == "write":
            stored["migrated"] = assemble(store, plan, r["head_similarity"].uri, entry, [l.uri for l in layers])
            steps["write"] = _step(stored["migrated"])
        elif wave == "train":
            if entry.lft:
                stored["lft"] = light_finetune(store, plan, entry, stored["migrated"].uri)
                steps["lft"] = _step(stored["lft"])
            if entry.vanilla:
                stored["vanilla"] = vanilla_baseline(store, plan, entry)
                steps["vanilla_baseline"] = _step(stored["vanilla"])
        elif wave == "gate" and entry.gate_key:
            stored["gate"] = quality_gate(store, plan, entry, (stored.get("lft") or stored["migrated"]).uri)
            steps["gate"] = _step(stored["gate"])
        elif wave == "eval" and entry.evals:
            results = [evaluate(store, plan, entry, job, stored[job.adapter].uri if job.adapter in stored else None)
                       for job in entry.evals]
            evals = {job.row: result.facts for job, result in zip(entry.evals, results)}
            steps["eval"] = _step(*results)
        elif wave == "publish":
            final = stored.get("lft") or stored["migrated"]
            publish(store, final.uri, output, report_updates(plan, entry, stored, evals, steps, store.root),
                    overwrite=overwrite)
    return json.loads((Path(storage.resolve(output)[1]) / REPORT_NAME).read_text()) \
        if not storage.is_remote(output) else storage.read_json(storage.join_uri(output, REPORT_NAME))


def _step(*results: StageResult) -> dict[str, Any]:
    """A report step from one or several stage results (per-layer parts summed)."""
    cache = "computed" if any(not r.reused for r in results) else "reused"
    return {"cache": cache, "seconds": round(sum(r.seconds for r in results), 4)}
