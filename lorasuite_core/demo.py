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

from .migrate import MigrationOptions, migrate
from .upgrade import UpgradeSpec, make_random_lora_adapter, make_tiny_model_dir, upgrade_model_dir
from .verification import logits_over_shared_vocab, relative_max_error

log = logging.getLogger(__name__)

DEMO_SPEC = dict(fold_norms=True, rotate_residual=True, permute_heads=True, permute_neurons=True, extra_neurons=32,
                 identity_layers=(1, 3), extra_vocab=50, renumber_vocab=True, seed=5)
WIDENING = dict(widen_residual=32, kv_replication=2, extra_query_heads_per_group=1)


def run_synthetic_demo(workdir: str | Path, *, family: str = "llama", progress: bool = True) -> dict:
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    log.info("building a tiny %s model, an adapter and an upgraded model in %s", family, workdir)
    old = make_tiny_model_dir(family, workdir / "old-model", seed=0, hidden_size=96, num_hidden_layers=4)
    adapter = make_random_lora_adapter(old, workdir / "old-adapter", rank=8, alpha=16, seed=1)
    spec = dict(DEMO_SPEC, **({} if family == "gpt_neox" else WIDENING))
    new = upgrade_model_dir(old, workdir / "new-model", UpgradeSpec(**spec))
    out = workdir / "migrated-adapter"
    report = migrate(old, new, adapter, out, MigrationOptions(progress=progress))
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
