"""Plans: what a migration will compute, and the key of every stage entry, before anything is computed.

* :func:`plan_pair` identifies both models (file listings, not tensors) and the calibration text and
  derives the keys of the pair-analysis stages (:mod:`lorasuite_core.pipeline.pair_stages`).
* :func:`plan_adapter` loads and checks one adapter against the old model and lists its per-layer jobs,
  its optional LFT / baseline / fidelity / gate / evaluation jobs and their keys
  (:mod:`lorasuite_core.pipeline.stages` runs them).  Keys chain: a stage's key includes the keys of
  the entries it reads, so an adapter produced from reused entries is bit-identical to one computed
  afresh.
* Loaded models and adapters are memoised per process by identity (:func:`_model`, :func:`_adapter`),
  because a worker runs many per-layer jobs of one pair.

Progress (:mod:`lorasuite_core.io.terminal`): :func:`plan_adapter` announces how many per-adapter
entries will come (layers, write, LFT, fidelity, gate, evaluation rows, publish).
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel as Schema  # the stage plans' schema base

from lorasuite_core.io import terminal
from lorasuite_core.io.uris import redact_uri
from lorasuite_core.transfer.activations import builtin_calibration_texts, read_calibration_file
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.loading import LoadedModel, LoraAdapter, load_base_model, load_lora_adapter
from lorasuite_core.transfer.adapter import check_adapter_fits, sources_by_new_layer
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.stage_store import (ADAPTER_PATTERNS, StageResult, artifact_identity, data_identity,
                                                 stage_key, texts_identity)

log = logging.getLogger(__name__)

#: Version of prompt synthesis in distilled LFT's stage key (2: the teacher's base model writes the prompts).
SYNTHESIS_VERSION = 2


# --------------------------------------------------------------------------- memoised loading


@lru_cache(maxsize=8)
def _model(ref: str, identity: str) -> LoadedModel:
    return load_base_model(ref)


@lru_cache(maxsize=16)
def _adapter(ref: str, identity: str, old_ref: str, old_identity: str) -> LoraAdapter:
    try:
        return load_lora_adapter(ref, _model(old_ref, old_identity).family)
    except FileNotFoundError:
        raise LorasuiteError(f"adapter {redact_uri(ref)} does not exist") from None


# --------------------------------------------------------------------------- the pair


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
    """The calibration samples: read, streamed and capped for a budget of ``max_tokens`` paired tokens; a
    ``task:NAME:SPLIT[:COUNT]`` spec gives the task's prompts in the built-in template (the text an adapter of
    that task reads), prompts only, no answers."""
    from lorasuite_core.training.skills import is_task_spec

    if is_task_spec(ref):
        return _task_calibration_texts(ref, max_tokens)
    return read_calibration_file(ref, max_tokens) if ref else builtin_calibration_texts()


def _task_calibration_texts(ref: str, max_tokens: int) -> list[str]:
    from lorasuite_core.training.prompts import prompts_from_samples
    from lorasuite_core.training.samples import load_samples
    from lorasuite_core.transfer.activations import CHARS_PER_TOKEN, MAX_TOKENS_PER_TEXT

    texts, collected = [], 0
    for prompt in prompts_from_samples(load_samples(ref)):      # the same budget rule as a calibration file
        texts.append(prompt.formatted())
        collected += min(len(texts[-1]), MAX_TOKENS_PER_TEXT)
        if collected >= CHARS_PER_TOKEN * max_tokens:
            break
    return texts


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
                                        layout="matches", heads=analysis.head_mapping,
                                        **({"fit": "activations"} if analysis.transfer_fit == "activations" else {}))
    return PairPlan(old_model=old_model, new_model=new_model, old_identity=old_id, new_identity=new_id,
                    analysis=analysis, calibration_identity=calibration, stage_keys=keys)


# --------------------------------------------------------------------------- an adapter


class LayerJob(Schema):
    new_layer: int
    sources: list[int]
    key: str

    @property
    def label(self) -> str:
        return f"new layer {self.new_layer}"


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
    fidelity_key: str | None = None      # the fidelity stage's entry, when the options ask for it
    evals: list[EvalJob] = []
    seconds: float = 0.0                 # time taken to load, check and plan


def check_adapter(old_model: str, adapter_ref: str, serving: str | None = None) -> None:
    """Before any analysis: the adapter loads (LoRA, finite tensors, known targets) and fits the old model;
    with ``serving`` it is not DoRA (which no serving engine applies, :mod:`lorasuite_core.serving`)."""
    old_identity = artifact_identity(old_model, "model")
    identity = artifact_identity(adapter_ref, "adapter", ADAPTER_PATTERNS)
    adapter = _adapter(adapter_ref, identity, old_model, old_identity)
    check_adapter_fits(adapter, _model(old_model, old_identity))
    if serving == "vllm" and adapter.variant.has_magnitude:
        raise LorasuiteError(f"adapter {adapter_ref} is DoRA, which vLLM cannot serve (nor do LoRAX/TGI apply its "
                             "magnitude vector); drop --serving vllm to migrate it for PEFT, or --serving vllm-lora for "
                             "a plain-LoRA approximation with its residual reported")


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
                                     seed=options.seed, compute=_training_compute(),
                                     **_distill_key_parts(plan, identity, options)),
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
    fidelity_key = None
    if options.fidelity:
        fidelity_key = stage_key("fidelity", adapters=[migrated_key, lft.key if lft else None],
                                 teacher=[plan.old_identity, identity], prompts=_fidelity_source(plan, options, lft),
                                 n=options.gate_prompts, seed=options.seed, version=FIDELITY_VERSION)
    for stage, count in (("layer", len(layers)), ("migrated", 1), ("lft", int(bool(lft))),
                         ("vanilla", int(bool(vanilla))), ("fidelity", int(bool(fidelity_key))),
                         ("gate", int(bool(gate_key))), ("eval", len(evals)), ("publish", 1)):
        terminal.expected(stage, count)          # the terminal sums each per-adapter stage into one line
    return AdapterPlan(name=name, adapter=adapter_ref, adapter_identity=identity, options=options,
                       modules=len(adapter.factors), layers=layers, migrated_key=migrated_key,
                       lft=lft, vanilla=vanilla, gate_key=gate_key, fidelity_key=fidelity_key, evals=evals,
                       seconds=time.perf_counter() - start)


#: Version of the fidelity measurement in its stage key.
FIDELITY_VERSION = 1


def _fidelity_source(plan: PairPlan, options: MigrationOptions, lft: TrainJob | None) -> str:
    """Where fidelity's held-out prompts come from (see :func:`fidelity`), as part of its key."""
    if lft is not None and options.lft_mode == "distill":
        return "distillation"
    if options.eval_data:
        return data_identity(options.eval_data, "evaluation data")
    return f"calibration:{plan.calibration_identity}"


def _training_compute() -> str:
    """The dtype LFT and baseline training multiply in here (bf16 autocast where the hardware has it): it changes
    the trained weights, so it is part of their stage keys."""
    from lorasuite_core.training.devices import training_compute_dtype

    return training_compute_dtype()


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
    rank = adapter.variant.baseline_rank(adapter.config)
    alpha = float(adapter.config.get("lora_alpha", rank))
    targets = sorted(adapter.target_names)
    use_dora = adapter.variant.baseline_use_dora
    key = stage_key("vanilla", model=plan.new_identity, data=data, samples=options.lft_samples,
                    epochs=options.lft_epochs, seed=options.seed, rank=rank, alpha=alpha, targets=targets,
                    use_dora=use_dora, compute=_training_compute())
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
    from lorasuite_core.training.devices import resolve_device

    dtype = eval_dtype("auto", resolve_device("auto"))      # bf16 where the CPU has it: part of the result
    return [EvalJob(row=row, model=model, adapter=kind,
                    key=stage_key("eval", model=model_id, adapter=adapter_key, data=data, n=options.eval_samples,
                                  seed=options.seed, generation="greedy-loop", dtype=dtype))
            for row, model, kind, model_id, adapter_key in rows]
