"""The skill fleet's stages that run in a child process of their own (``migration_benchmark.run_child``): see
``skill_fleet.py``'s docstring for the rows they compute."""
from __future__ import annotations

import time
from pathlib import Path

from migration_benchmark import _threads, stage_graph_migrate

#: LoRA rank and alpha of every adapter the benchmark trains (old adapters, vanilla, full retraining).
RANK, ALPHA = 16, 32.0

def stage_eval(model_dir: str, adapter_dir: str | None, spec: str, seed: int) -> dict:
    _threads()
    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.samples import load_samples

    result = evaluate(model_dir, load_samples(spec, None, seed=seed), adapter_dir=adapter_dir, batch_size=32,
                      keep_predictions=True, show_progress=False)
    data = result.to_dict()
    data["correct_mask"] = "".join("1" if p.correct else "0" for p in result.predictions)
    data["examples"] = [p.generation[:160] for p in result.predictions[:3]]
    return data


def stage_vanilla(model_dir: str, spec: str, out_dir: str, lr: float, seed: int) -> dict:
    _threads()
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.samples import load_samples
    from lorasuite_core.training.train import DEFAULT_TARGETS, train_lora

    result = train_lora(model_dir, load_samples(spec, None, seed=seed), out_dir, rank=RANK, alpha=ALPHA,
                        targets=DEFAULT_TARGETS, config=TrainConfig(lr=lr, epochs=1, seed=seed, show_progress=False))
    data = result.to_dict()
    data.pop("losses", None)
    return data


def stage_fresh_distill(old_dir: str, source_dir: str, new_dir: str, out_dir: str, migration: dict) -> dict:
    """The stage graph's distill step (``stages._distill``) with a fresh LoRA in place of the migrated adapter."""
    _threads()
    import json as _json
    import tempfile

    from lorasuite_core.pipeline.options import MigrationOptions
    from lorasuite_core.pipeline.plans import generation_dtype
    from lorasuite_core.training import distill as D
    from lorasuite_core.training import prompts as P
    from lorasuite_core.training.config import default_lft_config
    from lorasuite_core.training.train import load_tokenizer, prepare_fresh_lora
    from lorasuite_core.transfer.vocab import shared_vocabulary

    start = time.perf_counter()
    o = MigrationOptions(**migration)
    prompts = P.load_prompts(o.lft_prompts, o.lft_samples + o.gate_prompts, o.seed)
    train, heldout = P.split_heldout(prompts, o.gate_prompts, o.seed)
    source = _json.loads((Path(source_dir) / "adapter_config.json").read_text())
    shared = shared_vocabulary(load_tokenizer(old_dir), load_tokenizer(new_dir))
    with tempfile.TemporaryDirectory(prefix="fresh-lora-") as tmp:
        model, _ = prepare_fresh_lora(new_dir, rank=source["r"], alpha=source["lora_alpha"],
                                      targets=sorted(source["target_modules"]), seed=o.seed)
        model.save_pretrained(tmp)
        del model
        config = default_lft_config(lr=o.lft_lr, epochs=o.lft_epochs, seed=o.seed, show_progress=False)
        report = D.distill(old_dir, source_dir, new_dir, tmp, out_dir, train, heldout=heldout,
                           config=D.DistillConfig(kl_weight=o.lft_kl_weight, train=config,
                                                  generation_dtype=generation_dtype(o)),
                           shared_ids=(shared.old_ids.tolist(), shared.new_ids.tolist()))
    return {"seconds": time.perf_counter() - start, "light_finetune": report.to_dict(), "options": migration}


def stage_auto(old_dir: str, new_dir: str, adapter_dir: str, out_dir: str, cache_root: str, migration: dict) -> dict:
    """``--route auto`` through the stage graph; an entry where no candidate clears the gate publishes nothing
    (``refused``: the route's one-line reason, as the CLI prints it)."""
    from lorasuite_core.training.route import RouteFailed

    try:
        return stage_graph_migrate(old_dir, new_dir, adapter_dir, out_dir, cache_root, migration, {})
    except RouteFailed as failed:
        return {"refused": str(failed), "options": migration}
