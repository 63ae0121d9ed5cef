"""A tiny exact upgrade for the distillation and gate tests: old llama + random adapter, its function-preserving
upgrade, and the adapter migrated onto it by the pipeline (default options: no LFT data, so transfer only), so teacher and student compute the same function."""
from __future__ import annotations

from pathlib import Path

from lorasuite_core.pipeline import pair_stages, stages
from lorasuite_core.pipeline.options import AnalysisOptions
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

EXACT = UpgradeSpec(permute_heads=True, permute_neurons=True, extra_neurons=8)


def build_exact_fleet(root: Path, adapter_seeds: range) -> dict:
    """An exact upgrade (old, new), random adapters of the old model ("t0", "t1", …: different teachers, so the same
    prompt gets different answers) and an unlabelled prompt file of 6 built-in problems."""
    from lorasuite_core.training.task_data import generate_problems

    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", EXACT)
    adapters = {f"t{i}": make_random_lora_adapter(old, root / f"t{i}", rank=4, alpha=8, seed=seed)
                for i, seed in enumerate(adapter_seeds)}
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(s.instruction for s in generate_problems(6, "train", seed=2)) + "\n")
    return {"root": root, "old": old, "new": new, "adapters": adapters, "prompts": prompts}


def build_exact_pair(root: Path, spec: UpgradeSpec = EXACT) -> dict[str, Path]:
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", spec)
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=3)
    try:
        stages.migrate_in_process(str(old), str(new), str(adapter), str(root / "migrated"), None,
                                  AnalysisOptions(max_calibration_tokens=256), cache_root=str(root / "store"))
    finally:
        pair_stages.clear_memo()
    return {"old": old, "new": new, "adapter": adapter, "migrated": root / "migrated"}
