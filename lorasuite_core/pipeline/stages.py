"""The per-adapter stages as plain functions over references and store entries (wrapped by ``tasks/``).

Design
------
Inputs and outputs are *references* — model/adapter/data paths or URIs and entries of a
:class:`~lorasuite_core.pipeline.stage_store.StageStore` — so that each stage can run as its own job,
on any worker, and be reused when its entry already exists.  Arrays live in the entries' files
(safetensors); stages exchange only :class:`~lorasuite_core.pipeline.stage_store.StageResult`
(URI + small facts).  Never imports Prefect.

After :func:`~lorasuite_core.pipeline.plans.plan_adapter` and the pair analysis
(:mod:`~lorasuite_core.pipeline.pair_stages`): ``transfer_layer`` (the fan-out unit), ``assemble``,
``light_finetune`` (on the teacher's answers, :mod:`~lorasuite_core.pipeline.teacher_stage`),
``vanilla_baseline``, ``fidelity``, ``quality_gate``, ``evaluate`` (``evaluate_batch``: a fleet's rows of one
base model on one load), and :func:`publish` last (not stored: copy, report patched, manifest last).  Which stage reads which, when
each runs and the order: :mod:`lorasuite_core.pipeline.graph`, the one place they are declared;
:mod:`lorasuite_core.pipeline.runner` walks that graph in process (:func:`migrate_in_process`) and the
flows walk it with Prefect tasks generated from the same table (``tasks/stages.py``).

Progress (:mod:`lorasuite_core.io.terminal`): every stored stage reports its time from
:meth:`StageStore.run`; :func:`publish` reports its own.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal


from lorasuite_core.io import terminal
from lorasuite_core.io.publish import publish_dir_atomic
from lorasuite_core.io.uris import redact_uri
from lorasuite_core.io.tempdirs import private_tempdir
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.layer_results import load_layer_result, save_layer_result
from lorasuite_core.models.loading import resolve_local_dir
from lorasuite_core.models.writing import REPORT_NAME, adapter_config, adapter_tensors, write_adapter_dir
from lorasuite_core.report.migration import build_report
from lorasuite_core.transfer.adapter import effective_head_mapping, combine_layers, transfer_new_layer
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.stage_store import StageResult, StageStore

from lorasuite_core.pipeline.routes import FIDELITY_NAME
from lorasuite_core.pipeline.plans import AdapterPlan, EvalJob, LayerJob, PairPlan, _adapter, generation_dtype
from lorasuite_core.pipeline.pair_stages import _load_vocabulary, pair_analysis
from lorasuite_core.pipeline.unit_map_store import load_layer_maps
from lorasuite_core.training.heldout import HELDOUT, read_heldout, write_heldout

log = logging.getLogger(__name__)

PUBLISHED_EXTRA = ("training_summary.json",)


# --------------------------------------------------------------------------- per adapter: work


def transfer_layer(store: StageStore, plan: PairPlan, adapter: AdapterPlan, job: LayerJob,
                   analysis_uri: str, unit_maps_uri: str) -> StageResult:
    """The unit of per-layer work: carry every old layer mapped onto ``job.new_layer`` through the pair's unit
    maps (loaded, or computed here for an adapter in another mode than the pair's), re-factorise."""

    def compute(out: Path) -> dict:
        old, new = plan.old(), plan.new()
        analysis = pair_analysis(store, plan, analysis_uri)
        source = _adapter(adapter.adapter, adapter.adapter_identity, plan.old_model, plan.old_identity)
        mode = adapter.options.head_transform
        maps = None
        if job.unit_maps:
            where = store.local_dir(unit_maps_uri)
            maps = {i: load_layer_maps(where, i, job.new_layer, mode) for i in job.sources}
        result = transfer_new_layer(old, new, analysis, source, job.new_layer, list(job.sources), mode, maps)
        save_layer_result(result, out)
        return {"new_layer": job.new_layer, "modules": len(result.modules)}

    return store.run("layer", job.key, compute)


def assemble(store: StageStore, plan: PairPlan, adapter: AdapterPlan, analysis_uri: str,
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
        # the residual maps' source (options.transfer_fit); with activations, the per-pair fits (activation_fit.py)
        report["transfer_fit"] = store.facts(analysis_uri).get("transfer_fit", {"fit": plan.analysis.transfer_fit})
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


def light_finetune(store: StageStore, plan: PairPlan, adapter: AdapterPlan, migrated_uri: str,
                   teacher_uri: str | None = None) -> StageResult:
    """LFT of the migrated adapter on the new model: labelled (lorasuite_core.training.train.light_finetune)
    or distilled from the teacher, the old model + the old adapter (lorasuite_core.training.distill), on the
    ``teacher`` entry's prompts and completions."""
    return finetune(store, plan, adapter, "lft", adapter.lft, migrated_uri, teacher_uri)


def finetune(store: StageStore, plan: PairPlan, adapter: AdapterPlan, stage: str, job, start_uri: str,
             teacher_uri: str | None = None) -> StageResult:
    """LFT of the adapter entry ``start_uri`` by ``job`` into the entry ``(stage, job.key)``; distilled on the
    teacher entry ``teacher_uri`` (:mod:`.teacher_stage`: prompts and the teacher's completions, not generated here)."""
    from lorasuite_core.training.config import default_lft_config
    from lorasuite_core.training.train import light_finetune as run_lft

    def compute(out: Path) -> dict:
        start = store.local_dir(start_uri)
        config = default_lft_config(lr=job.lr, epochs=job.epochs, seed=job.seed, show_progress=False)
        if adapter.options.lft_mode == "distill":
            if teacher_uri is None:
                raise LorasuiteError("distillation: no teacher entry to read the teacher's completions from")
            facts = _distill(store, plan, adapter, start, out, config, teacher_uri)
        else:
            samples = load_samples(job.data, job.samples, "train", job.seed)
            facts = _train_facts(run_lft(resolve_local_dir(plan.new_model, "model"), start, samples, out,
                                         config=config))
            facts["lft_mode"] = "labelled"
        _restore_base_reference(out, plan.new_model)
        shutil.copy2(start / REPORT_NAME, out / REPORT_NAME)
        return facts

    return store.run(stage, job.key, compute)


def _heldout_eval(options: MigrationOptions) -> tuple[list, list | None]:
    """The evaluation data's first ``gate_prompts`` prompts (with their task) and gold samples (empty without eval
    data)."""
    from lorasuite_core.training import prompts as P

    if not options.eval_data:
        return [], None
    samples = load_samples(options.eval_data, options.gate_prompts, "test", options.seed)
    return P.prompts_from_samples(samples), samples


def _distill(store: StageStore, plan: PairPlan, adapter: AdapterPlan, migrated: Path, out: Path, config,
             teacher_uri: str) -> dict:
    """Distil on the teacher entry's prompts and completions (the teacher is loaded here only for the KL term)."""
    from lorasuite_core.pipeline.teacher_stage import read_teacher
    from lorasuite_core.training import distill as D

    o = adapter.options
    answers = read_teacher(store, teacher_uri)
    if answers.train is None:
        raise LorasuiteError(f"distillation: teacher entry {teacher_uri} holds no training prompts")
    vocabulary = _load_vocabulary(store, store.location("vocabulary", plan.stage_keys["vocabulary"]))
    report = D.distill(resolve_local_dir(plan.old_model, "model"), resolve_local_dir(adapter.adapter, "adapter"),
                       resolve_local_dir(plan.new_model, "model"), migrated, out, answers.train,
                       heldout=answers.heldout, config=D.DistillConfig(kl_weight=o.lft_kl_weight, train=config,
                                                               patience=o.lft_patience, on_policy=o.lft_on_policy,
                                                               generation_dtype=generation_dtype(o)),
                       shared_ids=(vocabulary.old_ids.tolist(), vocabulary.new_ids.tolist()),
                       prompt_source=answers.facts["prompt_source"], targets=answers.targets,
                       heldout_teacher=answers.heldout_teacher)
    write_heldout(out / HELDOUT, answers.heldout, report.heldout_teacher, report.heldout_student)
    dropped = answers.facts.get("duplicate_prompts_dropped")
    return {"lft_mode": "distill", **report.to_dict(), "reused_teacher_completions": True,
            **({"duplicate_prompts_dropped": dropped} if dropped is not None else {}),
            **({"consistency": answers.facts["consistency"]} if "consistency" in answers.facts else {})}


def quality_gate(store: StageStore, plan: PairPlan, adapter: AdapterPlan, final_uri: str,
                 teacher_uri: str | None = None) -> StageResult:
    """Agreement with the teacher on held-out prompts, against the bare new model's; a failure raises
    :class:`~lorasuite_core.training.gate.QualityGateFailed` with the numbers (also when reused).  The teacher's
    completions are the ``teacher`` entry's (the ones fidelity and distillation read); a distilled adapter's
    student completions on them are distillation's."""
    from lorasuite_core.pipeline.teacher_stage import read_teacher
    from lorasuite_core.training.gate import GateResult, check_gate, quality_gate as run_gate

    o = adapter.options

    def compute(out: Path) -> dict:
        if teacher_uri is None:
            raise LorasuiteError("quality gate: no held-out prompts (no evaluation data and no distillation)")
        final = store.local_dir(final_uri)
        eval_prompts, answers = _heldout_eval(o)
        kept = read_teacher(store, teacher_uri)
        prompts, teacher_completions, student_completions = kept.heldout, kept.heldout_teacher, None
        if eval_prompts and prompts != eval_prompts:
            raise LorasuiteError(f"the teacher's held-out prompts in {teacher_uri} are not the evaluation data's "
                                 f"first {o.gate_prompts}")
        if (final / HELDOUT).exists():   # a distilled adapter: the student already answered the same prompts
            stored_prompts, _, student_completions = read_heldout(final / HELDOUT)
            if stored_prompts != prompts:
                raise LorasuiteError(f"distillation's held-out prompts in {final} are not the teacher entry's")
        result = run_gate(resolve_local_dir(plan.new_model, "model"), final, prompts, teacher_completions,
                          answers=answers, margin=o.gate_margin, student_completions=student_completions,
                          dtype=generation_dtype(o))
        return {**result.to_dict(), "reused_completions": student_completions is not None}

    stored = store.run("gate", adapter.gate_key, compute)
    check_gate(GateResult(**{k: stored.facts[k] for k in GateResult.__dataclass_fields__ if k in stored.facts}))
    return stored


def fidelity(store: StageStore, plan: PairPlan, adapter: AdapterPlan, migrated_uri: str | None,
             lft_uri: str | None = None, copy_uri: str | None = None, fresh_lft_uri: str | None = None,
             teacher_uri: str | None = None) -> StageResult:
    """Fidelity (:mod:`lorasuite_core.training.fidelity`) of every candidate adapter that ran (the migrated one,
    "transfer"; its LFT, "lft"; "copy"; "fresh-distill") on the ``teacher`` entry's held-out prompts and completions
    (:mod:`.teacher_stage`: distillation's, else the evaluation data's first ``gate_prompts``, else calibration
    texts).  The prompts and the teacher's completions are kept in the entry (``heldout_prompts.json``) for the
    route."""
    from lorasuite_core.pipeline.teacher_stage import read_teacher
    from lorasuite_core.training.fidelity import measure_fidelity

    def compute(out: Path) -> dict:
        if teacher_uri is None:
            raise LorasuiteError("fidelity: no teacher entry to read the teacher's answers from")
        dirs = {name: store.local_dir(uri) for name, uri in (("transfer", migrated_uri), ("lft", lft_uri),
                                                              ("copy", copy_uri), ("fresh-distill", fresh_lft_uri))
                if uri}
        kept = read_teacher(store, teacher_uri)
        prompts, teacher = kept.heldout, kept.heldout_teacher
        old_dir, source_dir = resolve_local_dir(plan.old_model, "model"), resolve_local_dir(adapter.adapter, "adapter")
        write_heldout(out / HELDOUT, prompts, teacher)
        result = measure_fidelity(old_dir, source_dir, resolve_local_dir(plan.new_model, "model"), dirs,
                                  prompts, [c.text for c in teacher])
        return {**result.to_dict(), "prompts": kept.facts["prompts"], "reused_completions": True}

    return store.run("fidelity", adapter.fidelity_key, compute)


def vanilla_baseline(store: StageStore, plan: PairPlan, adapter: AdapterPlan) -> StageResult:
    """A fresh LoRA (same kind, rank, alpha, targets, data and epochs: :func:`_vanilla_job`) trained on the new model."""
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.train import train_lora

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


#: Evaluation rows on one model load (memory: the base, the rows' adapters, one 64-row batch's KV cache).
EVAL_BATCH_MAX = 8


def evaluate_batch(store: StageStore, plan: PairPlan, items: list[tuple[AdapterPlan, EvalJob, str | None]]) -> list:
    """:func:`evaluate` of rows of one base model and evaluation samples (the graph's ``batch_key``), the missing
    entries on one model load (:func:`~lorasuite_core.training.evaluation_fleet.evaluate_adapters`: each row's result is
    its own :func:`evaluate`'s); a row shared by entries (the bare model) is computed once.  Per item its entry, or
    its error where its adapter could not be found."""
    from lorasuite_core.training.evaluation_fleet import evaluate_adapters

    results: list = [None] * len(items)
    todo: dict[str, Path | None] = {}
    for k, (adapter, job, uri) in enumerate(items):
        if job.key in todo or store.problem(store.location("eval", job.key)) is None:
            continue
        try:
            todo[job.key] = (resolve_local_dir(adapter.adapter, "adapter") if job.adapter == "source"
                             else store.local_dir(uri) if uri else None)
        except Exception as error:  # noqa: BLE001 - this row fails, the others go on
            results[k] = error
    share, scored = 0.0, {}
    if todo:
        adapter, job, _ = items[0]
        o = adapter.options
        start = time.perf_counter()
        scored = evaluate_adapters(resolve_local_dir(plan.old_model if job.model == "old" else plan.new_model, "model"),
                                   load_samples(o.eval_data, o.eval_samples, "test", o.seed), todo)
        share = (time.perf_counter() - start) / len(todo)
    for k, (_, job, _) in enumerate(items):
        if results[k] is None:
            facts = {"row": job.row, **scored[job.key].to_dict()} if job.key in scored else {}
            results[k] = store.run("eval", job.key, lambda out, facts=facts: facts or _no_row(out),
                                   prior_seconds=share if job.key in scored else 0.0)
            scored.pop(job.key, None)             # a second item of the same row reuses the first's entry
    return results


def _no_row(out: Path) -> dict:
    raise LorasuiteError(f"evaluation entry vanished from the store while in use ({out})")


# --------------------------------------------------------------------------- publish


def publish(store: StageStore, source_uri: str, output: str, report_updates: dict[str, Any], *,
            overwrite: bool = False, serving: str | None = None, base_model: str | None = None) -> str:
    """Copy a finished adapter entry to ``output`` with its report updated; atomically, manifest last.

    The report's ``serving`` says what vLLM, LoRAX and TGI accept of the published adapter
    (:func:`lorasuite_core.serving.check_serving`); ``serving="vllm"`` publishes the exact plain-LoRA
    export instead (:func:`lorasuite_core.serving.export_plain_lora`, recorded as ``serving_export``);
    ``"vllm-lora"`` also approximates a DoRA adapter on ``base_model`` (the new model) by plain LoRA, its
    residual reported."""
    from lorasuite_core.serving import check_serving, export_plain_lora
    start = time.perf_counter()
    source = store.local_dir(source_uri)
    with private_tempdir("publish") as staged:
        for name in ("adapter_config.json", "adapter_model.safetensors", *PUBLISHED_EXTRA):
            if (source / name).is_file():
                shutil.copy2(source / name, staged / name)
        report = json.loads((source / REPORT_NAME).read_text())
        report.update(report_updates)
        if serving:
            exported = staged.parent / f"{staged.name}-{serving}"
            report["serving_export"] = export_plain_lora(
                staged, exported, dora_base_model=base_model if serving == "vllm-lora" else None)
            shutil.rmtree(staged)
            exported.rename(staged)
        report["serving"] = check_serving(staged)
        for engine, verdict in report["serving"].items():
            if not verdict["servable"]:
                log.info("%s would not serve %s as published: %s", engine, output, "; ".join(verdict["problems"]))
        (staged / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        published = publish_dir_atomic(staged, output, overwrite=overwrite)
    terminal.finished("publish", time.perf_counter() - start, reused=False)
    return published


# --------------------------------------------------------------------------- the report


def report_updates(plan: PairPlan, entry: AdapterPlan, stored: dict[str, StageResult],
                   evals: dict[str, dict[str, Any]], steps: dict[str, Any], cache_root: str,
                   **pipeline: Any) -> dict[str, Any]:
    """What the published migration_report.json gets on top of the assembled report."""
    options = {**entry.options.model_dump(mode="json"), **plan.analysis.model_dump(mode="json")}
    updates: dict[str, Any] = {"steps": steps, "pipeline": {
        **pipeline, "stage_store": redact_uri(cache_root),
        "keys": {**plan.stage_keys, "migrated": entry.migrated_key}},
        "options": {k: redact_uri(v) if isinstance(v, str) else v for k, v in options.items()}}
    if "lft" in stored:
        updates["light_finetune"] = {k: v for k, v in stored["lft"].facts.items() if k != "losses"}
    if "vanilla" in stored:
        updates["vanilla_baseline"] = {k: v for k, v in stored["vanilla"].facts.items() if k != "losses"}
    updates["route"] = route_summary(entry, stored)
    if "fidelity" in stored:
        updates["fidelity"] = dict(stored["fidelity"].facts)
    if "route" in stored:
        updates["quality_gate"] = dict(updates["route"]["gate"])
    if "gate" in stored:
        updates["quality_gate"] = dict(stored["gate"].facts)
    if "quality_gate" in updates and "fidelity" in stored:
        updates["quality_gate"]["fidelity"] = stored["fidelity"].facts["fidelity"]
    if evals:
        updates["evaluation"] = {row: {k: f[k] for k in ("accuracy", "ci_low", "ci_high", "n", "correct")}
                                 for row, f in evals.items()}
    return updates


def route_summary(entry: AdapterPlan, stored: dict[str, StageResult]) -> dict[str, Any]:
    """The report's ``route``: the route asked for, the candidates (with their numbers where scored), the one chosen
    and why (``auto``: the route stage's facts; one route: asked for)."""
    if "route" in stored:
        facts = stored["route"].facts
        return {"route": "auto", **{k: facts[k] for k in ("chosen", "reason", "candidates", "gate")}}
    [(route, stage)] = entry.candidates.items()
    fidelity = stored["fidelity"].facts["fidelity"] if "fidelity" in stored else {}
    name = FIDELITY_NAME[stage]
    candidate = {"route": route, **({"fidelity": fidelity[name]} if name in fidelity else {})}
    if "gate" in stored:
        gate = stored["gate"].facts
        candidate.update(passed=gate["passed"], teacher_agreement=gate["student_agreement"],
                         bare_agreement=gate["bare_agreement"])
    return {"route": route, "chosen": route, "reason": f"asked for (--route {route})", "candidates": [candidate]}


def migrate_in_process(old_model: str, new_model: str, adapter: str, output: str,
                       options: MigrationOptions | None = None, analysis: AnalysisOptions | None = None, *,
                       cache_root: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """:func:`lorasuite_core.pipeline.runner.migrate_in_process`: both stage graphs run here, without Prefect."""
    from lorasuite_core.pipeline.runner import migrate_in_process as run

    return run(old_model, new_model, adapter, output, options, analysis, cache_root=cache_root, overwrite=overwrite)
