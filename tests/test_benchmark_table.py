"""The benchmark's table logic: which rows appear, which stage times a target uses, what it concludes."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "migration_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("migration_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval(accuracy):
    return {"accuracy": accuracy, "ci_low": accuracy - 0.05, "ci_high": accuracy + 0.05, "n": 500, "seconds": 10.0}


def _stages(**extra):
    stages = {
        "transfer": {"seconds": 200.0}, "lft_100": {"seconds": 400.0}, "train_full": {"seconds": 5000.0},
        "train_vanilla_100": {"seconds": 420.0},
        "eval_lorasuite_lft_100": _eval(0.35), "eval_vanilla_lora_100": _eval(0.31), "eval_full_retrain": _eval(0.66),
    }
    stages.update(extra)
    return stages


def test_short_lft_rows_follow_the_configured_lft_and_are_timed_with_the_lone_transfer(bench):
    stages = _stages(transfer_retimed={"seconds": 90.0, "threads": 2}, lft_100_1ep={"seconds": 150.0},
                     eval_lorasuite_lft_100_1ep=_eval(0.3))
    rows = bench.rows(stages)
    assert rows[rows.index("lorasuite_lft_100") + 1] == "lorasuite_lft_100_1ep"
    assert bench._row_stage_seconds(stages, "lorasuite_lft_100_1ep") == {"transfer": 90.0, "lft": 150.0}
    assert bench._row_stage_seconds(stages, "lorasuite_lft_100") == {"transfer": 200.0, "lft": 400.0}
    lines = bench.targets(stages, "within")
    two_epochs = next(l for l in lines if "(lorasuite_lft_100)" in l)
    one_epoch = next(l for l in lines if "(lorasuite_lft_100_1ep)" in l)
    assert "NOT met" in two_epochs and "12.0% of 5000 s" in two_epochs        # (200 + 400) / 5000
    assert ": met" in one_epoch and "4.8% of 5000 s" in one_epoch             # (90 + 150) / 5000


def test_accuracy_targets_compare_the_rows_they_name(bench):
    lines = bench.targets(_stages(), "within")
    assert "- LoRASuite + LFT-100 above vanilla LoRA-100: met" in lines
    assert "- LoRASuite + LFT-100 at or above full retraining: NOT met" in lines
    assert not any("2 minutes" in l for l in lines)                           # a cross-pair target only
    missing = bench.targets({"eval_vanilla_lora_100": _eval(0.3)}, "cross")
    assert "- LoRASuite + LFT-100 above vanilla LoRA-100: not measured" in missing


def test_drift_diagnosis_counts_stated_answers(bench):
    diag = {"delta_relative_distance": {"q_proj": {"mean": 0.002, "max": 0.01}},
            "generations": {"old_adapter_on_old_model": {"accuracy": 0.5, "n": 2, "generations": [
                "2 + 2 = 4. The answer is 4.", "3 | 4 = 7. 7 + 1 = 8. 8 +"]}}}
    text = "\n".join(bench.diagnosis_lines(diag))
    assert "q_proj 0.0020 (max 0.0100)" in text
    assert "| old adapter on old model | 0.500 | 0.50 | `2 + 2 = 4. The answer is 4.` |" in text
