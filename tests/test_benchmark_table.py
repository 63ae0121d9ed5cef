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


def test_short_rows_follow_their_base_rows_and_are_timed_like_for_like(bench):
    stages = _stages(transfer_retimed={"seconds": 90.0, "threads": 2}, lft_100_1ep={"seconds": 150.0},
                     train_vanilla_100_1ep={"seconds": 140.0}, train_full_retimed={"seconds": 3000.0},
                     eval_lorasuite_lft_100_1ep=_eval(0.3), eval_vanilla_lora_100_1ep=_eval(0.32))
    rows = bench.rows(stages)
    assert rows[rows.index("vanilla_lora_100") + 1] == "vanilla_lora_100_1ep"
    assert rows[rows.index("lorasuite_lft_100") + 1] == "lorasuite_lft_100_1ep"
    assert bench._row_stage_seconds(stages, "lorasuite_lft_100_1ep") == {"transfer": 90.0, "lft": 150.0}
    assert bench._row_stage_seconds(stages, "lorasuite_lft_100") == {"transfer": 200.0, "lft": 400.0}
    assert bench._row_stage_seconds(stages, "vanilla_lora_100_1ep") == {"train": 140.0}
    lines = bench.targets(stages, "within")
    ratio = lambda row: next(l for l in lines if l.startswith(f"- transfer + LFT wall time") and f"({row})" in l)
    assert "NOT met" in ratio("lorasuite_lft_100") and "12.0% of train_full 5000 s" in ratio("lorasuite_lft_100")
    assert ": met" in ratio("lorasuite_lft_100_1ep")                           # (90 + 150) / 3000, both alone
    assert "8.0% of train_full_retimed 3000 s" in ratio("lorasuite_lft_100_1ep")
    assert ("- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100_1ep vs vanilla_lora_100_1ep): NOT met"
            in lines)                                                          # 0.30 < 0.32: same epochs compared


def test_accuracy_targets_compare_the_rows_they_name(bench):
    lines = bench.targets(_stages(), "within")
    assert "- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100 vs vanilla_lora_100): met" in lines
    assert "- LoRASuite + LFT-100 at or above full retraining (lorasuite_lft_100): NOT met" in lines
    assert not any("2 minutes" in l for l in lines)                           # a cross-pair target only
    missing = bench.targets({"eval_vanilla_lora_100": _eval(0.3)}, "cross")
    assert ("- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100 vs vanilla_lora_100): not measured"
            in missing)
    assert "- transfer alone ≤ 2 minutes: not measured" in missing


def test_drift_diagnosis_counts_stated_answers(bench):
    diag = {"delta_relative_distance": {"q_proj": {"mean": 0.002, "max": 0.01}},
            "generations": {"old_adapter_on_old_model": {"accuracy": 0.5, "n": 2, "generations": [
                "2 + 2 = 4. The answer is 4.", "3 | 4 = 7. 7 + 1 = 8. 8 +"]}}}
    text = "\n".join(bench.diagnosis_lines(diag))
    assert "q_proj 0.0020 (max 0.0100)" in text
    assert "| old adapter on old model | 0.500 | 0.50 | `2 + 2 = 4. The answer is 4.` |" in text


def test_transfer_stage_times_split_into_pair_analysis_and_per_adapter_work(bench):
    from lorasuite_core.pipeline.stages import PAIR_STAGES

    steps = {name: {"cache": "computed", "seconds": 10.0} for name in PAIR_STAGES}
    steps.update(load={"seconds": 6.0}, transfer={"seconds": 29.0}, write={"seconds": 0.4})
    line = bench.transfer_stage_lines("transfer_retimed", steps)[0]
    assert line.startswith("Stages of transfer_retimed (s): ")
    assert line.endswith(f"per model pair (cached, once per fleet) {10 * len(PAIR_STAGES)}, per adapter 35.")
