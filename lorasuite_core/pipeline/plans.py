"""Plans: what a migration will compute, and the key of every stage entry, before anything is computed.

* :func:`plan_pair` identifies both models (file listings, not tensors) and the calibration text and
  derives the keys of the pair-analysis stages (:mod:`lorasuite_core.pipeline.pair_stages`).  The
  ``unit_maps`` stage is keyed by the pair's ``head_transform`` (the mode the maps are solved in): the
  runner passes the mode its adapters ask for (the default where they differ); an adapter in another
  mode computes its maps in its own layer jobs (:attr:`LayerJob.unit_maps` false), equal bit for bit.
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
from lorasuite_core.transfer.residual import FIT_VERSION
from lorasuite_core.transfer.unit_maps import CARRY_DTYPE
from lorasuite_core.pipeline import routes
from lorasuite_core.pipeline.options import AnalysisOptions, HeadTransform, MigrationOptions
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
    activations_dtype: str = "float32"     # the activations stage's compute dtype (:func:`activations_dtype`)
    head_transform: HeadTransform = "lstsq"     # the mode of the unit_maps entry

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


def activations_dtype(analysis: AnalysisOptions) -> str:
    """The calibration forward passes in bfloat16 (autocast) where the CPU multiplies bf16 natively and the states
    feed only CKA, a ranking; float32 where the transfer is fitted on them (``transfer_fit`` activations: exact
    under function-preserving upgrades) or the CPU has no bf16 matrix unit.  Part of the activations key."""
    from lorasuite_core.training.devices import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() and analysis.transfer_fit != "activations" else "float32"


def plan_pair(old_model: str, new_model: str, analysis: AnalysisOptions | None = None,
              head_transform: HeadTransform = "lstsq") -> PairPlan:
    """Identify both models (file listings, not tensors) and the calibration text; derive the keys
    (``head_transform``: the mode of the pair's unit maps)."""
    analysis = analysis or AnalysisOptions()
    calibration_data, max_calibration_tokens = analysis.calibration_data, analysis.max_calibration_tokens
    layer_offset = analysis.layer_offset
    old_id = artifact_identity(old_model, "model")
    new_id = artifact_identity(new_model, "model")
    calibration = texts_identity(calibration_texts(calibration_data, max_calibration_tokens))
    keys = {"vocabulary": stage_key("vocabulary", old=old_id, new=new_id)}
    keys["transfer_matrix"] = stage_key("transfer_matrix", vocabulary=keys["vocabulary"], version=FIT_VERSION)
    dtype = activations_dtype(analysis)
    keys["activations"] = stage_key("activations", old=old_id, new=new_id, calibration=calibration,
                                    max_tokens=max_calibration_tokens,
                                    **({"compute": dtype} if dtype != "float32" else {}))
    keys["cka"] = stage_key("cka", activations=keys["activations"])
    keys["layer_mapping"] = stage_key("layer_mapping", cka=keys["cka"], offset=layer_offset,
                                      method=analysis.layer_mapping)
    fit = {"fit": "activations", "ridge": "held-out"} if analysis.transfer_fit == "activations" else {}
    keys["head_similarity"] = stage_key("head_similarity", transfer_matrix=keys["transfer_matrix"],
                                        layer_mapping=keys["layer_mapping"], activations=keys["activations"],
                                        layout="matches", heads=analysis.head_mapping, **fit)
    keys["unit_maps"] = stage_key("unit_maps", head_similarity=keys["head_similarity"], mode=head_transform,
                                  layout="maps-per-layer", carry=str(CARRY_DTYPE))
    return PairPlan(old_model=old_model, new_model=new_model, old_identity=old_id, new_identity=new_id,
                    analysis=analysis, calibration_identity=calibration, stage_keys=keys,
                    head_transform=head_transform, activations_dtype=dtype)


# --------------------------------------------------------------------------- an adapter


class LayerJob(Schema):
    new_layer: int
    sources: list[int]
    key: str
    unit_maps: bool = True          # load the pair's unit maps (same mode); False: compute them in the job

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
    adapter: Literal["source", "copy", "migrated", "lft", "fresh_lft", "vanilla"] | None
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
    candidates: dict[str, str] = {}      # candidate route -> the stage holding its adapter (routes.candidate_stages)
    copy_key: str | None = None          # route copy: the old adapter as is
    fresh_key: str | None = None         # route fresh-distill: the fresh start (B = 0) ...
    fresh_lft: TrainJob | None = None    # ... and its distillation
    route_key: str | None = None         # route auto: the choice among the candidates
    teacher_key: str | None = None       # the teacher's completions (:mod:`.teacher_stage`), read by every consumer

    @property
    def writes_migrated(self) -> bool:
        """The transfer's adapter is assembled (a candidate itself, or the start of its LFT)."""
        return any(stage in ("migrated", "lft") for stage in self.candidates.values())

    @property
    def transfers(self) -> bool:
        """The per-layer transfer runs (for the migrated adapter, or as the fresh start's template)."""
        return self.writes_migrated or self.fresh_lft is not None

    def candidate_keys(self) -> dict[str, str]:
        """The stage holding each candidate's adapter -> that entry's key."""
        keys = {"copy": self.copy_key, "migrated": self.migrated_key, "lft": self.lft.key if self.lft else None,
                "fresh_lft": self.fresh_lft.key if self.fresh_lft else None}
        return {stage: keys[stage] for stage in self.candidates.values()}


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


@lru_cache(maxsize=16)
def copy_refusal(old_model: str, old_identity: str, new_model: str, new_identity: str) -> str | None:
    """:func:`routes.copy_refusal` of the pair (configs and tokenisers, not weights), once per pair and process:
    the pre-run check of ``--route copy`` and every ``auto`` adapter's plan share it."""
    return routes.copy_refusal(_model(old_model, old_identity), _model(new_model, new_identity))


def check_route(old_model: str, new_model: str, options: MigrationOptions) -> None:
    """:func:`routes.check_route`; only ``copy`` identifies and opens the models (a remote one is resolved then)."""
    routes.check_route(options, lambda: copy_refusal(old_model, artifact_identity(old_model, "model"),
                                                     new_model, artifact_identity(new_model, "model")))


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
    cached = mode == plan.head_transform          # the pair's unit_maps entry holds this mode's maps
    layers = [LayerJob(new_layer=j, sources=sources[j], unit_maps=cached,
                       key=stage_key("layer", analysis=analysis.key, adapter=identity, new_layer=j,
                                     sources=sources[j], mode=mode,
                                     unit_maps=plan.stage_keys["unit_maps"] if cached else None))
              for j in sorted(sources)]
    zero_init = options.adds_zero_init
    migrated_key = stage_key("migrated", analysis=analysis.key, adapter=identity, mode=mode, layers=[l.key for l in layers],
                             refs=[plan.old_model, plan.new_model, adapter_ref], offset=plan.layer_offset,
                             **({"zero_init": True, "seed": options.seed} if zero_init else {}))
    copy_ok = options.route == "copy" or (options.route == "auto" and copy_refusal(
        plan.old_model, plan.old_identity, plan.new_model, plan.new_identity) is None)
    candidates = routes.candidate_stages(options, copy_ok)
    lft = vanilla = fresh_lft = None
    data = data_identity(options.lft_data, "LFT data") if options.lft_data else None
    runs_lft = options.runs_lft and "lft" in candidates.values()
    distilled = options.lft_mode == "distill" and (runs_lft or "fresh_lft" in candidates.values())
    teacher_key = _teacher_key(plan, identity, options, distilled)
    if runs_lft:
        lft = _train_job(plan, options, data, migrated=migrated_key,
                         **_distill_key_parts(plan, identity, options, teacher_key))
        if options.runs_vanilla:
            vanilla = _vanilla_job(plan, adapter, options, data)
    copy_key = stage_key("copy", adapter=identity, new=plan.new_identity, ref=plan.new_model) if copy_ok else None
    fresh_key = None
    if "fresh_lft" in candidates.values():
        fresh_key = stage_key("fresh", layers=[l.key for l in layers], model=plan.new_identity, seed=options.seed,
                              refs=[plan.new_model, adapter_ref])
        fresh_lft = _train_job(plan, options, data, fresh=fresh_key,
                               **_distill_key_parts(plan, identity, options, teacher_key))
    draft = AdapterPlan(name=name, adapter=adapter_ref, adapter_identity=identity, options=options,
                        modules=len(adapter.factors), layers=layers, migrated_key=migrated_key, lft=lft,
                        vanilla=vanilla, candidates=candidates, copy_key=copy_key, fresh_key=fresh_key,
                        fresh_lft=fresh_lft, teacher_key=teacher_key)
    if not draft.transfers:
        draft.layers = []
    keys = draft.candidate_keys()
    teacher = [plan.old_identity, identity, teacher_key]
    held_out = data_identity(options.eval_data, "evaluation data") if options.eval_data else "lft-heldout"
    if options.gate and options.route != "auto":            # auto gates every candidate in its route stage
        draft.gate_key = stage_key("gate", adapter=next(iter(keys.values())), teacher=teacher, heldout=held_out,
                                   n=options.gate_prompts, margin=options.gate_margin, seed=options.seed,
                                   version=GATE_VERSION)
    if options.fidelity or options.route == "auto":
        adapters = [migrated_key if draft.writes_migrated else None, lft.key if lft else None]
        adapters += [keys[s] for s in ("copy", "fresh_lft") if s in keys]
        draft.fidelity_key = stage_key("fidelity", adapters=adapters, teacher=teacher,
                                       prompts=_fidelity_source(plan, options, lft or fresh_lft),
                                       n=options.gate_prompts, seed=options.seed, version=FIDELITY_VERSION)
    if options.route == "auto":
        draft.route_key = stage_key("route", candidates=keys, fidelity=draft.fidelity_key, teacher=teacher,
                                    heldout=held_out, n=options.gate_prompts, margin=options.gate_margin,
                                    seed=options.seed, version=ROUTE_VERSION)
    draft.evals = _eval_jobs(plan, identity, draft, options) if options.eval_data else []
    for stage, count in (("layer", len(draft.layers)), ("teacher", int(bool(teacher_key))),
                         ("migrated", int(draft.writes_migrated)),
                         ("copy", int(bool(copy_key))), ("fresh", int(bool(fresh_key))), ("lft", int(bool(lft))),
                         ("fresh_lft", int(bool(fresh_lft))), ("vanilla", int(bool(vanilla))),
                         ("fidelity", int(bool(draft.fidelity_key))), ("route", int(bool(draft.route_key))),
                         ("gate", int(bool(draft.gate_key))), ("eval", len(draft.evals)), ("publish", 1)):
        terminal.expected(stage, count)          # the terminal sums each per-adapter stage into one line
    draft.seconds = time.perf_counter() - start
    return draft


#: Version of the route choice in its stage key: 2 = per-prompt agreement flags and the sign-test rule
#: (lorasuite_core.training.route).
ROUTE_VERSION = 2


def _train_job(plan: PairPlan, options: MigrationOptions, data: str | None, **start: Any) -> TrainJob:
    """The LFT of a start (``migrated=`` the transfer's key, or ``fresh=`` the fresh start's): the options' LFT."""
    stage = "lft" if "migrated" in start else "fresh_lft"
    key = stage_key(stage, **start, model=plan.new_identity, data=data, samples=options.lft_samples,
                    lr=options.lft_lr, epochs=options.lft_epochs, seed=options.seed, compute=_training_compute())
    return TrainJob(key=key, data=options.lft_data, samples=options.lft_samples, lr=options.lft_lr,
                    epochs=options.lft_epochs, seed=options.seed)


#: Versions of what a stage computes, in its key.  Gate, distillation 2 and fidelity 3: a prompt of a registered
#: skill is generated with the skill's stop rule and budget, and agreement with the teacher is judged by the
#: skill's scorer (:func:`lorasuite_core.training.agreement.answers_agree`), not the final number; fidelity 2: the
#: teacher answers in the evaluation dtype, as the gate (which then reuses them).
FIDELITY_VERSION = 3
GATE_VERSION = 2
DISTILL_VERSION = 2


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


def _distill_key_parts(plan: PairPlan, adapter_identity: str, options: MigrationOptions,
                       teacher_key: str | None) -> dict[str, Any]:
    """What a distilled LFT depends on beyond labelled LFT: the teacher (and its completions' entry), the prompts,
    the KL weight, held-out set."""
    if options.lft_mode != "distill":
        return {}
    return {"lft_mode": "distill", "distill_version": DISTILL_VERSION,
            "teacher": [plan.old_identity, adapter_identity, teacher_key],
            "prompts": data_identity(options.lft_prompts, "LFT prompts") if options.lft_prompts else None,
            "seeds": data_identity(options.lft_seed_prompts, "seed prompts") if options.lft_seed_prompts else None,
            **({"synthesis": SYNTHESIS_VERSION} if options.lft_seed_prompts else {}),
            "kl_weight": options.lft_kl_weight, "heldout_n": options.gate_prompts,
            "heldout": data_identity(options.eval_data, "evaluation data") if options.eval_data else None,
            "vocabulary": plan.stage_keys["vocabulary"],
            # only when set, so the keys of runs without them (and their caches) stay as they were
            **({"patience": options.lft_patience} if options.lft_patience is not None else {}),
            **({"dedup": True} if options.lft_dedup else {}), **_consistency(options), **_on_policy(options)}


def _on_policy(options: MigrationOptions) -> dict[str, Any]:
    """On-policy distillation's part of a key (only when on: other runs' keys stay as they were)."""
    if options.lft_on_policy == 0:
        return {}
    from lorasuite_core.training.on_policy import ON_POLICY_VERSION, SAMPLE_TEMPERATURE

    return {"on_policy": [options.lft_on_policy, SAMPLE_TEMPERATURE, ON_POLICY_VERSION]}


def _consistency(options: MigrationOptions) -> dict[str, Any]:
    """The self-consistency filter's part of a key (only when set: other runs' keys stay as they were)."""
    if options.lft_consistency is None:
        return {}
    from lorasuite_core.training.consistency import CONSISTENCY_VERSION, MIN_AGREEMENT, TEMPERATURE

    return {"consistency": [options.lft_consistency, TEMPERATURE, MIN_AGREEMENT, CONSISTENCY_VERSION]}


#: Version of the teacher stage's completions in its key (the greedy rules: distillation's, the gate's).
TEACHER_VERSION = 1


def generation_dtype(options: MigrationOptions) -> str:
    """The dtype name the pipeline's greedy generation runs in (``options.generation_dtype``; "auto": bf16 where
    the hardware has it, as evaluation: :func:`~lorasuite_core.training.evaluation.eval_dtype`)."""
    from lorasuite_core.training.devices import resolve_device
    from lorasuite_core.training.evaluation import eval_dtype

    return eval_dtype(options.generation_dtype, resolve_device("auto"))


def teacher_compute(options: MigrationOptions) -> str:
    """The dtype and device the teacher generates in (:func:`generation_dtype`), part of its key and so of every
    key that names the teacher (distillation, fidelity, the gate, the route: they generate in the same dtype)."""
    from lorasuite_core.training.devices import resolve_device

    return f"{generation_dtype(options)}@{resolve_device('auto').type}"


def _teacher_key(plan: PairPlan, adapter_identity: str, options: MigrationOptions, distilled: bool) -> str | None:
    """The teacher stage's key (None: no consumer reads teacher completions): the old model, the source adapter,
    the prompts exactly as the consumers pick them (:func:`~lorasuite_core.pipeline.teacher_stage.teacher_prompts`)
    and the generation's rules and dtype.  Consumers: distilled LFT (training and held-out prompts), fidelity (its
    held-out prompts: distillation's, else the evaluation data's, else calibration texts) and the gate."""
    heldout = data_identity(options.eval_data, "evaluation data") if options.eval_data else None
    if distilled:
        seeds = options.lft_seed_prompts if options.synthesises_prompts else None
        ref = options.lft_prompts or (None if seeds else options.lft_data)
        prompts: dict[str, Any] = {
            "from": "distillation", "prompts": data_identity(ref, "LFT prompts") if ref else None,
            "seeds": data_identity(seeds, "seed prompts") if seeds else None,
            **({"synthesis": SYNTHESIS_VERSION} if seeds else {}), "samples": options.lft_samples,
            "heldout": heldout, **({"dedup": True} if options.lft_dedup else {}), **_consistency(options)}
    elif options.fidelity or options.route == "auto" or (options.gate and heldout):
        prompts = {"from": "heldout", "heldout": heldout or f"calibration:{plan.calibration_identity}"}
    else:
        return None
    return stage_key("teacher", old=plan.old_identity, adapter=adapter_identity, prompts=prompts,
                     n=options.gate_prompts, seed=options.seed, compute=teacher_compute(options), version=TEACHER_VERSION)


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


#: The evaluation row of each adapter stage.
EVAL_ROWS = {"copy": "new model + old adapter copied", "migrated": "new model + migrated (transfer)",
             "lft": "new model + migrated + LFT", "fresh_lft": "new model + fresh LoRA, distilled",
             "vanilla": "new model + vanilla LoRA"}


def _eval_jobs(plan: PairPlan, adapter_identity: str, entry: AdapterPlan, options: MigrationOptions) -> list[EvalJob]:
    data = data_identity(options.eval_data, "evaluation data")
    rows = [("old model + source adapter", "old", "source", plan.old_identity, adapter_identity),
            ("new model, no adapter", "new", None, plan.new_identity, None)]
    keys = {**entry.candidate_keys(), **({"migrated": entry.migrated_key} if entry.writes_migrated else {}),
            **({"vanilla": entry.vanilla.key} if entry.vanilla else {})}
    rows += [(row, "new", stage, plan.new_identity, keys[stage]) for stage, row in EVAL_ROWS.items() if stage in keys]
    from lorasuite_core.training.evaluation import eval_dtype
    from lorasuite_core.training.devices import resolve_device

    dtype = eval_dtype("auto", resolve_device("auto"))      # bf16 where the CPU has it: part of the result
    return [EvalJob(row=row, model=model, adapter=kind,
                    key=stage_key("eval", model=model_id, adapter=adapter_key, data=data, n=options.eval_samples,
                                  seed=options.seed, generation="greedy-loop", dtype=dtype))
            for row, model, kind, model_id, adapter_key in rows]
