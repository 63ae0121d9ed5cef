"""The stages of the routes beyond the transfer (:mod:`.routes`): ``copy``, ``fresh`` + ``fresh_lft``, ``route``.

* :func:`copy_adapter` — the old adapter as is, pointed at the new model (only planned where
  :func:`~lorasuite_core.pipeline.routes.copy_refusal` finds nothing).
* :func:`fresh_start` — Trans-LoRA's start: a fresh LoRA on the new model with the migrated adapter's
  modules, rank and alpha (:func:`~lorasuite_core.transfer.adapter.zero_init_modules` on every layer:
  B = 0, A initialised as PEFT does, seeded by ``--seed``), so it computes the bare new model.
* :func:`fresh_distill` — that start distilled exactly like the ``distill`` route's LFT (same prompts,
  teacher, KL weight, lr, epochs: :func:`~lorasuite_core.pipeline.stages.finetune`), on the teacher completions
  the ``distill`` route's LFT reads too (the ``teacher`` entry, :mod:`~lorasuite_core.pipeline.teacher_stage`).
* :func:`choose_route` — ``--route auto``: every candidate on the gate's held-out prompts, with the
  teacher's completions the ``fidelity`` stage kept and distillation's student completions, and their
  fidelity; the choice (:func:`lorasuite_core.training.route.choose`) is copied into the entry.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lorasuite_core.models.loading import resolve_local_dir
from lorasuite_core.models.writing import REPORT_NAME, adapter_config, adapter_tensors, write_adapter_dir
from lorasuite_core.pipeline.layer_results import load_layer_result
from lorasuite_core.pipeline.plans import AdapterPlan, PairPlan, _adapter, generation_dtype
from lorasuite_core.pipeline.routes import FIDELITY_NAME
from lorasuite_core.pipeline.stage_store import StageResult, StageStore
from lorasuite_core.pipeline.stages import PUBLISHED_EXTRA, _heldout_eval, finetune
from lorasuite_core.training.heldout import HELDOUT, read_heldout

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _start_report(plan: PairPlan, adapter: AdapterPlan, route: str, **facts) -> dict:
    return {"old_model": plan.old_model, "new_model": plan.new_model, "adapter": {"source": adapter.adapter},
            "start": {"route": route, **facts}}


def copy_adapter(store: StageStore, plan: PairPlan, adapter: AdapterPlan) -> StageResult:
    """The old adapter's files as they are, its config pointed at the new model."""

    def compute(out: Path) -> dict:
        source = resolve_local_dir(adapter.adapter, "adapter")
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, out / name)
        config = json.loads((out / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = plan.new_model
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / REPORT_NAME).write_text(json.dumps(_start_report(plan, adapter, "copy"), indent=2) + "\n")
        return {"modules": adapter.modules}

    return store.run("copy", adapter.copy_key, compute)


def fresh_start(store: StageStore, plan: PairPlan, adapter: AdapterPlan, layer_uris: list[str]) -> StageResult:
    """A fresh LoRA with the migrated modules' names (most common rank and alpha) on every new layer, B = 0."""
    from lorasuite_core.transfer.adapter import MigratedAdapter, combine_layers, zero_init_modules

    def compute(out: Path) -> dict:
        start = time.perf_counter()
        new = plan.new()
        source = _adapter(adapter.adapter, adapter.adapter_identity, plan.old_model, plan.old_identity)
        migrated = combine_layers(new, [load_layer_result(store.local_dir(uri)) for uri in layer_uris])
        modules = zero_init_modules(new, migrated.modules, adapter.options.seed, covered=())
        fresh = MigratedAdapter(modules, {}, migrated.dropped, {}, sorted({m.layer for m in modules}))
        report = _start_report(plan, adapter, "fresh-distill", seed=adapter.options.seed,
                               seconds=round(time.perf_counter() - start, 4))
        write_adapter_dir(out, adapter_config(source.config, new, fresh), adapter_tensors(new, fresh), report,
                          overwrite=True)
        return {"modules": len(modules), "rank": modules[0].rank if modules else 0,
                "alpha": modules[0].alpha if modules else 0.0}

    return store.run("fresh", adapter.fresh_key, compute)


def fresh_distill(store: StageStore, plan: PairPlan, adapter: AdapterPlan, fresh_uri: str,
                  teacher_uri: str | None = None) -> StageResult:
    """The fresh start distilled like the ``distill`` route, on the same ``teacher`` entry."""
    return finetune(store, plan, adapter, "fresh_lft", adapter.fresh_lft, fresh_uri, teacher_uri)


def choose_route(store: StageStore, plan: PairPlan, adapter: AdapterPlan, copy_uri: str | None,
                 migrated_uri: str | None, lft_uri: str | None, fresh_lft_uri: str | None,
                 fidelity_uri: str) -> StageResult:
    """Score every candidate, copy the chosen one's adapter into the entry; no candidate clearing the gate raises
    :class:`~lorasuite_core.training.route.RouteFailed` with the best one's numbers (also when reused)."""
    from lorasuite_core.training.route import RouteFailed, choose, score_candidates

    uris = {"copy": copy_uri, "migrated": migrated_uri, "lft": lft_uri, "fresh_lft": fresh_lft_uri}
    o = adapter.options

    def compute(out: Path) -> dict:
        dirs = {route: store.local_dir(uris[stage]) for route, stage in adapter.candidates.items()}
        fidelity_dir = store.local_dir(fidelity_uri)
        prompts, teacher, _ = read_heldout(fidelity_dir / HELDOUT)     # the gate's prompts (routes.check_route)
        eval_prompts, answers = _heldout_eval(o)
        if eval_prompts and eval_prompts != prompts:
            raise ValueError("route: the fidelity stage's held-out prompts are not the evaluation data's")
        students = {route: read_heldout(d / HELDOUT)[2] for route, d in dirs.items() if (d / HELDOUT).exists()}
        scores = store.facts(fidelity_uri)["fidelity"]
        fidelity = {route: scores.get(FIDELITY_NAME[stage]) for route, stage in adapter.candidates.items()}
        candidates = score_candidates(resolve_local_dir(plan.new_model, "model"), dirs, prompts, teacher,
                                      answers=answers, margin=o.gate_margin,
                                      students={k: v for k, v in students.items() if v is not None}, fidelity=fidelity,
                                      dtype=generation_dtype(o))
        facts = {"candidates": [c.to_dict() for c in candidates]}
        try:
            chosen, reason = choose(candidates)
        except RouteFailed as failed:
            return {**facts, "chosen": None, "reason": str(failed), "best": failed.best, "gate": None}
        for name in (*ADAPTER_FILES, *PUBLISHED_EXTRA, REPORT_NAME):
            if (dirs[chosen.route] / name).is_file():
                shutil.copy2(dirs[chosen.route] / name, out / name)
        return {**facts, "chosen": chosen.route, "reason": reason, "gate": chosen.gate.to_dict()}

    stored = store.run("route", adapter.route_key, compute)
    if stored.facts["chosen"] is None:
        raise RouteFailed(stored.facts["best"])
    return stored
