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
    assert any(l.startswith("- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100_1ep vs vanilla_lora_100_1ep): "
                            "NOT met (0.300 vs 0.320; difference -0.020, 95% CI [") for l in lines)  # same epochs compared


def test_accuracy_targets_compare_the_rows_they_name(bench):
    lines = bench.targets(_stages(), "within")
    assert any(l.startswith("- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100 vs vanilla_lora_100): met "
                            "(0.350 vs 0.310; difference +0.040") for l in lines)
    assert "- LoRASuite + LFT-100 at or above full retraining (lorasuite_lft_100): NOT met" in lines
    assert not any("2 minutes" in l for l in lines)                           # a cross-pair target only
    missing = bench.targets({"eval_vanilla_lora_100": _eval(0.3)}, "cross")
    assert ("- LoRASuite + LFT-100 above vanilla LoRA-100 (lorasuite_lft_100_graph vs vanilla_lora_100_1ep): not "
            "measured" in missing)                          # the cross pair's labelled row is the stage graph's
    assert not any("(lorasuite_lft_100 vs" in l for l in missing)
    assert "- transfer alone ≤ 2 minutes: not measured" in missing


def test_drift_diagnosis_counts_stated_answers(bench):
    diag = {"delta_relative_distance": {"q_proj": {"mean": 0.002, "max": 0.01}},
            "generations": {"old_adapter_on_old_model": {"accuracy": 0.5, "n": 2, "generations": [
                "2 + 2 = 4. The answer is 4.", "3 | 4 = 7. 7 + 1 = 8. 8 +"]}}}
    text = "\n".join(bench.diagnosis_lines(diag))
    assert "q_proj 0.0020 (max 0.0100)" in text
    assert "| old adapter on old model | 0.500 | 0.50 | `2 + 2 = 4. The answer is 4.` |" in text


def test_transfer_stage_times_split_into_pair_analysis_and_per_adapter_work(bench):
    from lorasuite_core.pipeline.graph import PAIR_STAGES

    steps = {name: {"cache": "computed", "seconds": 10.0} for name in PAIR_STAGES}
    steps.update(load={"seconds": 6.0}, transfer={"seconds": 29.0}, write={"seconds": 0.4})
    line = bench.transfer_stage_lines("transfer_retimed", steps)[0]
    assert line.startswith("Stages of transfer_retimed (s): ")
    assert line.endswith(f"per model pair (cached, once per fleet) {10 * len(PAIR_STAGES)}, per adapter 35.")


def _wilson(correct, n):
    from lorasuite_core.training.evaluation import wilson_interval

    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n, "ci_low": low, "ci_high": high, "n": n, "seconds": 10.0}


def test_each_pair_lists_its_rows_and_the_within_pair_keeps_its_committed_rows(bench):
    qwen = bench.rows({}, "qwen")
    assert qwen[:5] == ["new_base", "old_adapter", "vanilla_lora_100", "lorasuite_transfer", "lorasuite_lft_100"]
    assert "lorasuite_lft_100_graph" not in qwen and "lorasuite_distill_100" in qwen
    assert qwen[-4:] == ["ablation_sequential_transfer", "ablation_sequential_distill_100",
                         "ablation_identity_heads_transfer", "ablation_identity_heads_distill_100"]
    assert "lorasuite_lft_100_graph" in bench.rows({}, "cross")
    assert bench.rows({}, "within") == ["new_base", "old_adapter", "vanilla_lora_100", "lorasuite_transfer",
                                        "lorasuite_lft_100", "full_retrain"]
    table = "\n".join(bench.table_lines({"eval_new_base": _eval(0.1)}, "qwen"))
    assert "| lorasuite_distill_100 | not run |" in table and "float32 (not recorded)" in table


def test_stage_graph_rows_are_timed_by_the_transfer_plus_their_own_lft_step(bench):
    stages = {"transfer": {"seconds": 300.0}, "distill_100": {"seconds": 900.0, "lft_seconds": 500.0},
              "lft_100": {"seconds": 700.0, "lft_seconds": 400.0}, "ablation_sequential": {"seconds": 120.0}}
    assert bench._row_stage_seconds(stages, "lorasuite_distill_100") == {"transfer": 300.0, "lft": 500.0}
    assert bench._row_stage_seconds(stages, "lorasuite_lft_100") == {"transfer": 300.0, "lft": 400.0}   # qwen: graph
    assert bench._row_stage_seconds(stages, "ablation_sequential_transfer") == {"migrate": 120.0}
    assert bench._row_stage_seconds({"lft_100": {"seconds": 459.0}}, "lorasuite_lft_100")["lft"] == 459.0  # cross


def test_newcombe_interval_of_a_difference(bench):
    a, b = _wilson(120, 200), _wilson(90, 200)
    d, low, high = bench.diff_ci(a, b)
    assert d == pytest.approx(0.15)
    # Newcombe (1998) method 10 from the Wilson limits, written out
    assert low == pytest.approx(0.15 - ((0.6 - a["ci_low"]) ** 2 + (b["ci_high"] - 0.45) ** 2) ** 0.5)
    assert high == pytest.approx(0.15 + ((a["ci_high"] - 0.6) ** 2 + (0.45 - b["ci_low"]) ** 2) ** 0.5)
    assert 0.05 < low < 0.06 and 0.24 < high < 0.25


def _masks(r: int, s: int, t: int, u: int) -> tuple[dict, dict]:
    """Two evaluated rows over the same n problems with the paired counts (r, s, t, u)."""
    a = "1" * r + "1" * s + "0" * t + "0" * u
    b = "1" * r + "0" * s + "1" * t + "0" * u
    return ({**_wilson(r + s, len(a)), "correct_mask": a}, {**_wilson(r + t, len(b)), "correct_mask": b})


def test_paired_interval_is_the_independent_one_when_the_rows_are_uncorrelated(bench):
    a, b = _masks(54, 66, 36, 44)        # r·u − s·t = 0: no correlation, psi = 0
    assert bench.paired_counts(a, b) == (54, 66, 36, 44)
    unpaired = bench.diff_ci({k: v for k, v in a.items() if k != "correct_mask"}, b)
    assert bench.diff_ci(a, b) == pytest.approx(unpaired, abs=1e-12)
    assert unpaired == pytest.approx(bench.diff_ci(*map(_wilson_only, (a, b))))


def _wilson_only(row: dict) -> dict:
    return {k: row[k] for k in ("accuracy", "ci_low", "ci_high")}


def test_paired_interval_narrows_when_the_rows_agree(bench):
    same = _masks(150, 0, 0, 50)          # the same problems solved: no difference, and nothing to doubt it
    d, low, high = bench.diff_ci(*same)
    assert d == 0 and -0.02 < low <= 0 <= high < 0.02
    a, b = _masks(110, 10, 0, 80)         # a solves 10 problems more, b none a does not: outside the noise
    d, low, high = bench.diff_ci(a, b)
    _, ind_low, ind_high = bench.diff_ci(*map(_wilson_only, (a, b)))
    assert d == pytest.approx(0.05) and 0 < low < d < high and ind_low < 0 < ind_high
    assert high - low < 0.5 * (ind_high - ind_low)


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time(bench):
    """Seeded simulation: 2000 paired samples of n = 200 with P(both, a only, b only, neither) = (.5, .1, .05, .35);
    the paired interval covers the true difference 0.05 close to 95% of the time, the independent one (it ignores
    the correlation) nearly always -- it is too wide."""
    import numpy as np

    rng = np.random.default_rng(0)
    counts = rng.multinomial(200, [0.5, 0.1, 0.05, 0.35], size=2000)
    paired = np.mean([(lambda d, lo, hi: lo <= 0.05 <= hi)(*bench.paired_interval(*map(int, c))) for c in counts])
    independent = np.mean([(lambda d, lo, hi: lo <= 0.05 <= hi)(*bench.diff_ci(
        *map(_wilson_only, _masks(*map(int, c))))) for c in counts])
    assert 0.93 <= paired <= 0.97 and independent > 0.99


def test_qwen_distill_targets(bench):
    stages = {"eval_lorasuite_distill_100": _wilson(120, 200), "eval_lorasuite_lft_100": _wilson(110, 200),
              "eval_old_adapter": _wilson(130, 200), "eval_vanilla_lora_100": _wilson(105, 200),
              "transfer": {"seconds": 300.0, "cpu_seconds": 200.0},
              "distill_100": {"seconds": 900.0, "lft_seconds": 500.0, "cpu_seconds": 700.0, "options": {"lft_epochs": 1}},
              "train_full": {"seconds": 10000.0, "cpu_seconds": 8000.0, "n_samples": 2000}}
    lines = bench.distill_targets(stages, "qwen")
    first = lines[0]
    assert first.startswith("- Distill-100 without labels ≥ labelled LFT-100 (lorasuite_distill_100 vs lorasuite_lft_100): "
                            "met (0.600 vs 0.550; difference +0.050") and first.endswith("inside the noise)")
    assert lines[1] == "- transfer + distill-100 ≥ 90% of the old adapter on the old model: met (0.600 = 92% of 0.650)"
    assert lines[2].startswith("- transfer + distill-100 above vanilla LoRA-100 outside the CI: NOT met (0.600 vs "
                               "0.525; difference +0.075")                   # above, but inside the noise
    assert lines[2].endswith("inside the noise)")
    assert lines[3] == ("- transfer + distill-100 wall time ≤ 10% of full retraining: met (transfer 300 s + distill "
                        "500 s = 8.0% of train_full 10000 s; CPU seconds: 200 + 700 = 11.2% of 8000; full retraining "
                        "on 2000 samples)")
    stages["eval_vanilla_lora_100"] = _wilson(80, 200)                                      # now clearly below
    assert bench.distill_targets(stages, "qwen")[2].startswith("- transfer + distill-100 above vanilla LoRA-100 "
                                                               "outside the CI: met")
    del stages["train_full"]                                       # not run: estimated from vanilla's steps
    stages["train_vanilla_100"] = {"cpu_seconds": 1300.0, "steps": 13}
    stages["train_old_adapter"] = {"steps": 50, "n_samples": 400}
    assert bench.distill_targets(stages, "qwen")[3] == (
        "- transfer + distill-100 time ≤ 10% of full retraining (estimated: full retraining not run): NOT met (CPU "
        "seconds: transfer 200 + distill 700 (whole stage) = 18.0% of an estimated 5000 for 50 steps (400 samples) at "
        "vanilla LoRA-100's 100 CPU s per step on the same model)")


def test_cross_distill_is_held_against_the_like_for_like_labelled_row_when_measured(bench):
    stages = {"eval_lorasuite_distill_100": _eval(0.2), "eval_lorasuite_lft_100_1ep": _eval(0.192),
              "eval_lorasuite_lft_100": _eval(0.198), "distill_100": {"options": {"lft_epochs": 1}}}
    assert bench.labelled_peer(stages, "cross") == "lorasuite_lft_100_1ep"        # the same epochs, earlier code
    stages["eval_lorasuite_lft_100_graph"] = _eval(0.25)
    lines = bench.distill_targets(stages, "cross")
    assert lines[0].startswith("- Distill-100 without labels ≥ labelled LFT-100 (lorasuite_distill_100 vs "
                               "lorasuite_lft_100_graph): NOT met (0.200 vs 0.250")
    assert len(lines) == 2 and lines[1] == "- transfer + distill-100 wall time ≤ 10% of full retraining: not measured"
    assert bench.labelled_peer({}, "qwen") == "lorasuite_lft_100"


def test_ablation_lines_state_where_differences_lie_inside_the_noise(bench):
    mapping = [[0, 0], [1, 2]]
    stages = {"eval_lorasuite_transfer": _wilson(10, 500), "eval_ablation_sequential_transfer": _wilson(12, 500),
              "transfer": {"layer_mapping": mapping}, "ablation_sequential": {"layer_mapping": mapping},
              "eval_lorasuite_distill_100": _wilson(200, 500), "eval_ablation_identity_heads_distill_100": _wilson(100, 500)}
    lines = bench.ablation_lines(stages)
    assert lines[0].startswith("- CKA -> sequential layer mapping, transfer (ablation_sequential_transfer vs "
                               "lorasuite_transfer): 0.020 → 0.024 (the same layer mapping as CKA's); difference +0.004")
    assert lines[0].endswith("inside the noise")
    assert lines[1].endswith("distill-100 (ablation_sequential_distill_100 vs lorasuite_distill_100): not measured")
    assert lines[3].startswith("- Hungarian -> identity head mapping, distill-100") and "0.400 → 0.200" in lines[3]
    assert lines[3].endswith("outside the noise")


def test_distill_prompt_file_trains_on_the_labelled_rows_prompts(bench, tmp_path):
    from lorasuite_core.training.prompts import read_prompts, split_heldout
    from lorasuite_core.training.task_data import generate_problems

    path = bench.write_distill_prompts(tmp_path / "p.jsonl", 20, 3, n_heldout=6)
    train, heldout = split_heldout(read_prompts(str(path)), 6, 3)        # what the pipeline's distill stage does
    assert [(p.instruction, p.input) for p in train] == [(s.instruction, s.input) for s in generate_problems(20, "train", 3)]
    assert [p.instruction for p in heldout] == [s.instruction for s in generate_problems(6, "train", 1003)]
    mtime = path.stat().st_mtime_ns
    bench.write_distill_prompts(tmp_path / "p.jsonl", 20, 3, n_heldout=6)
    assert path.stat().st_mtime_ns == mtime                              # unchanged: not rewritten


def test_rebuilt_outputs_say_whether_training_reproduced(bench):
    stages = {"rebuilt_train_old_adapter": {"seconds": 3000.0, "final_loss": 0.5, "recorded_final_loss": 0.5,
                                            "reproduces_recorded_final_loss": True}}
    assert bench.rebuilt_lines(stages) == ["- train_old_adapter rebuilt in 3000 s, the recorded final loss reproduced "
                                           "exactly"]


def test_distill_seed_rows_follow_distill_100_and_state_the_run_to_run_difference(bench):
    seed1, seed0 = _masks(150, 20, 30, 0)       # of the same 200 problems seed 0 solves 180, seed 1 170
    stages = {"eval_lorasuite_distill_100": seed0, "eval_lorasuite_distill_100_seed1": seed1,
              "eval_lorasuite_distill_100_seed12": seed1,
              "transfer": {"seconds": 300.0}, "distill_100_seed1": {"seconds": 900.0, "lft_seconds": 500.0}}
    listed = bench.rows(stages, "qwen")
    at = listed.index("lorasuite_distill_100")
    assert listed[at + 1:at + 3] == ["lorasuite_distill_100_seed1", "lorasuite_distill_100_seed12"]
    assert bench._row_stage_seconds(stages, "lorasuite_distill_100_seed1") == {"transfer": 300.0, "lft": 500.0}
    first = bench.seed_lines(stages)[0]
    assert first.startswith("- distill-100, training seed 0 -> 1 (lorasuite_distill_100_seed1 vs lorasuite_distill_100): "
                            "0.900 → 0.850; difference -0.050, 95% CI [")
    d, low, high = bench.diff_ci(seed1, seed0)
    assert first.endswith(f"[{low:+.3f}, {high:+.3f}], inside the noise") and low < 0 < high
    assert bench._seed_list("1,2") == [1, 2]
    with pytest.raises(Exception, match="training seeds >= 1"):
        bench._seed_list("0")
