"""Fidelity (lorasuite_core.training.fidelity): per-character losses against references, and F in every report.

* F against hand-computed values, and its undefined case.
* The per-character loss of a model whose logits are all zero (the uniform distribution over V) is
  ``n_tokens * log V / characters``: computed by hand from the tokenizer alone.
* The batched, padded scorer equals a direct sum of ``-log softmax`` over each unpadded sequence.
* End to end: after a function-preserving upgrade the transferred adapter explains the teacher's answers as
  well as the teacher (F = 1), an adapter of another model does not (F far from 1); the report, the
  migrate summary and the fleet summary cell carry it.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasuite_core.pipeline import pair_stages, plans, teacher_stage
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.stages import migrate_in_process
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.training.distill import greedy_completions
from lorasuite_core.training.prompts import Prompt
from lorasuite_core.training.evaluation import load_for_generation
from lorasuite_core.training.fidelity import completion_nll, fidelity_of, measure_fidelity, per_character, scoring_examples

PROMPTS = [Prompt("What is 3 plus 4?"), Prompt("Name a colour.", "Short answer"), Prompt("Count to three.")]
TEXTS = ["3 + 4 = 7. The answer is 7.", "Blue, like the sky", "one two three"]


def test_fidelity_against_hand_computed_values():
    assert fidelity_of(bare_new=2.0, migrated=1.5, teacher=1.0) == pytest.approx(0.5)
    assert fidelity_of(bare_new=1.075, migrated=1.075, teacher=0.066) == 0.0
    assert fidelity_of(bare_new=1.075, migrated=0.132, teacher=0.066) == pytest.approx(0.943 / 1.009)
    assert fidelity_of(bare_new=2.0, migrated=2.5, teacher=1.0) == pytest.approx(-0.5)   # worse than no adapter
    assert fidelity_of(bare_new=1.0, migrated=0.5, teacher=1.0) is None                   # no gap to close
    assert fidelity_of(bare_new=0.9, migrated=0.5, teacher=1.0) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    return make_tiny_model_dir("llama", root / "model", seed=3), root


def test_uniform_model_scores_log_vocabulary_per_token(tiny):
    model_dir, root = tiny
    zero = root / "zero"
    zero.mkdir()
    for item in model_dir.iterdir():
        (zero / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(zero / "model.safetensors"))
    model, tokenizer = load_for_generation(zero, dtype="float32", device="cpu")
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    expected = tokens * math.log(vocab) / sum(len(t) for t in TEXTS)
    assert per_character(model, tokenizer, PROMPTS, TEXTS) == pytest.approx(expected, rel=1e-6)


def test_batched_scorer_equals_direct_sum(tiny):
    model_dir, _ = tiny
    model, tokenizer = load_for_generation(model_dir, dtype="float32", device="cpu")
    direct = 0.0
    for example in scoring_examples(tokenizer, PROMPTS, TEXTS):
        ids = torch.tensor([example["input_ids"]])
        log_p = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for t, label in enumerate(example["labels"]):
            if label != -100:
                direct -= float(log_p[t - 1, label])
    assert completion_nll(model, tokenizer, PROMPTS, TEXTS, batch_size=2) == pytest.approx(direct, rel=1e-5)


@pytest.fixture(scope="module")
def migrated(tiny):
    """A function-preserving upgrade and the source adapter migrated transfer-only (fidelity on by default)."""
    model_dir, root = tiny
    new = upgrade_model_dir(model_dir, root / "new", UpgradeSpec(rotate_residual=True, permute_heads=True))
    adapter = make_random_lora_adapter(model_dir, root / "adapter", rank=4, alpha=8, seed=11)
    report = migrate_in_process(model_dir, new, adapter, root / "out", MigrationOptions(lft=False, gate_prompts=4),
                                AnalysisOptions(max_calibration_tokens=256), cache_root=str(root / "store"))
    yield model_dir, new, adapter, root, report
    pair_stages.clear_memo()


def test_function_preserving_upgrade_has_fidelity_one(migrated):
    *_, report = migrated
    facts = report["fidelity"]
    assert facts["prompts"] == "calibration texts" and facts["n"] == 4 and facts["characters"] > 0
    assert facts["teacher"] < facts["new"]          # the adapter moves the model: there is a gap to close
    assert facts["adapters"]["transfer"] == pytest.approx(facts["teacher"], rel=1e-4)
    assert facts["fidelity"]["transfer"] == pytest.approx(1.0, abs=1e-3)
    assert report["steps"]["fidelity"]["cache"] == "computed"


def test_another_adapters_teacher_is_not_matched(migrated, tmp_path):
    """The check has teeth: the same migrated adapter scored on the answers of another adapter's teacher."""
    old, new, _, root, _ = migrated
    other = make_random_lora_adapter(old, tmp_path / "other", rank=4, alpha=8, seed=99)
    prompts = [Prompt(t[:teacher_stage.FIDELITY_PROMPT_CHARS]) for t in plans.calibration_texts(None, 256)[:4]]
    model, tokenizer = load_for_generation(old, other, dtype="float32", device="cpu")
    texts = [c.text for c in greedy_completions(model, tokenizer, prompts)]
    crossed = measure_fidelity(old, other, new, {"transfer": root / "out"}, prompts, texts, device="cpu")
    assert crossed.fidelity["transfer"] < 0.5


def test_fidelity_off_and_fleet_cell(migrated, tmp_path):
    old, new, adapter, root, _ = migrated
    report = migrate_in_process(old, new, adapter, tmp_path / "out", MigrationOptions(lft=False, fidelity=False),
                                AnalysisOptions(max_calibration_tokens=256), cache_root=str(root / "store"))
    assert "fidelity" not in report and "fidelity" not in report["steps"]
    from flows.artifacts import _fidelity_cell

    assert _fidelity_cell({"summary": {"fidelity": {"transfer": 0.12345, "lft": None}}}) == "transfer 0.123, lft n/a"
    assert _fidelity_cell({"summary": {}}) == "-"
