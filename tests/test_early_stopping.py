"""Distillation's recipe knobs: early stopping on held-out teacher agreement, prompt de-duplication, their options
and stage keys (tiny exact upgrade, CPU, seconds)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.early_stopping import EarlyStopping
from lorasuite_core.training.task_data import generate_problems
from lorasuite_core.training.train import ADAPTER_WEIGHTS
from tests.distill_setup import build_exact_pair
from tests.test_distill import GEN, lft_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_exact_pair(tmp_path_factory.mktemp("early_stopping_pair"))


@pytest.fixture(scope="module")
def data(pair):
    """Training prompts whose targets are the teacher's answers to *other* prompts (so training pulls the student
    away from the teacher and later epochs are worse on held-out prompts), and held-out prompts with the teacher's
    true answers."""
    teacher, tokenizer = D.load_for_generation(pair["old"], pair["adapter"], dtype="float32", device="cpu")
    train = P.prompts_from_samples(generate_problems(8, "train", 1))
    heldout = P.prompts_from_samples(generate_problems(4, "train", 2))
    answers = D.greedy_completions(teacher, tokenizer, train, **GEN)
    wrong = answers[1:] + answers[:1]
    return {"train": train, "targets": wrong, "heldout": heldout,
            "heldout_teacher": D.greedy_completions(teacher, tokenizer, heldout, **GEN), "teacher": (teacher, tokenizer)}


def _distill(pair, data, out, *, epochs: int, patience: int | None):
    teacher, tokenizer = data["teacher"]
    # a constant learning rate: epoch k's weights do not depend on how many epochs are planned, so a run of k
    # epochs is the first k epochs of a longer one
    config = lft_config(lr=1e-3, epochs=epochs, lr_schedule="constant")
    return D.distill_finetune(pair["new"], pair["migrated"], data["train"], data["targets"], out, config=config,
                              teacher=teacher, teacher_tokenizer=tokenizer, kl_weight=0.0, patience=patience,
                              heldout=data["heldout"], heldout_teacher=data["heldout_teacher"], gen=GEN)


def test_the_best_epoch_is_published_not_the_last(pair, data, tmp_path):
    run = _distill(pair, data, tmp_path / "stopped", epochs=3, patience=3)      # patience 3: every epoch runs
    report = run.early_stopping.to_dict()
    scores = report["epochs"]
    assert [s["epoch"] for s in scores] == [1, 2, 3] and report["epochs_run"] == 3 and not report["stopped_early"]
    best = report["best_epoch"]
    key = lambda s: (s["agreement"], -s["heldout_loss"])
    assert best == max(scores, key=key)["epoch"]
    assert key(scores[-1]) < key(scores[best - 1])          # the case: the last epoch is worse than the best
    assert run.training.steps == 3 * 2                       # 8 prompts, batch 4: 2 steps an epoch
    published = load_file(str(tmp_path / "stopped" / ADAPTER_WEIGHTS))
    only_best = _distill(pair, data, tmp_path / "best", epochs=best, patience=None)
    assert only_best.early_stopping is None
    reference = load_file(str(tmp_path / "best" / ADAPTER_WEIGHTS))
    assert published.keys() == reference.keys() and all(torch.equal(published[k], reference[k]) for k in published)
    last = _distill(pair, data, tmp_path / "last", epochs=3, patience=None)
    final = load_file(str(tmp_path / "last" / ADAPTER_WEIGHTS))
    assert any(not torch.equal(published[k], final[k]) for k in published)   # without patience: the last epoch
    # the published epoch's held-out answers are the reloaded adapter's
    student, tokenizer = D.load_for_generation(pair["new"], tmp_path / "stopped", dtype="float32", device="cpu")
    again = D.greedy_completions(student, tokenizer, data["heldout"], **GEN)
    assert [c.text for c in again] == [c.text for c in run.early_stopping.completions]
    assert D.teacher_agreement(again, data["heldout_teacher"]) == scores[best - 1]["agreement"]
    assert last.training.steps == 6


def test_patience_stops_training(pair, data, tmp_path):
    run = _distill(pair, data, tmp_path / "p1", epochs=6, patience=1)
    report = run.early_stopping.to_dict()
    assert report["epochs_run"] == report["best_epoch"] + 1 < 6 and report["stopped_early"]
    assert len(report["epochs"]) == report["epochs_run"] and run.training.steps == 2 * report["epochs_run"]
    assert run.to_dict()["early_stopping"] == report


class _Scripted:
    """Scores read off a script, one (agreement, loss) per epoch."""

    def __init__(self, script):
        self.script, self.epoch = list(script), -1

    def generate(self, model):
        self.epoch += 1
        return [self.epoch]

    def agreement(self, completions):
        return self.script[completions[0]][0]

    def loss(self, model):
        return self.script[self.epoch][1]


def _run(script, patience):
    """The stop rule over a scripted run; the model's weight is set to the epoch number before each score."""
    model = torch.nn.Linear(1, 1, bias=False)
    s = _Scripted(script)
    stopping = EarlyStopping(patience=patience, max_epochs=len(script), generate=s.generate, agreement=s.agreement,
                             heldout_loss=s.loss)
    model.train()
    for epoch in range(len(script)):
        with torch.no_grad():
            model.weight.fill_(epoch + 1.0)
        if stopping.end_of_epoch(epoch, model):
            break
    assert model.training                                 # scored in eval mode, handed back in train mode
    stopping.restore(model)
    return stopping, float(model.weight.detach())


def test_the_stop_rule_agreement_first_loss_breaks_ties():
    stopping, weight = _run([(0.5, 1.0), (0.75, 2.0), (0.75, 2.5), (0.5, 0.1), (1.0, 0.0)], patience=2)
    assert [s.epoch for s in stopping.scores] == [1, 2, 3, 4] and stopping.best.epoch == 2 and weight == 2.0
    assert stopping.to_dict()["stopped_early"] and stopping.to_dict()["best_epoch"] == 2
    stopping, weight = _run([(0.5, 1.0), (0.5, 0.9), (0.5, 0.95)], patience=5)   # a tie: the lower held-out loss
    assert stopping.best.epoch == 2 and weight == 2.0 and not stopping.to_dict()["stopped_early"]
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0, max_epochs=1, generate=list, agreement=len, heldout_loss=len)


# --------------------------------------------------------------------------- prompts, options, keys

def test_deduplicate_drops_repeats_and_held_out_leaks():
    prompts = [P.Prompt("What is 2 + 3?"), P.Prompt("what is  2 +\t3?"), P.Prompt("What is 4 + 4?"),
               P.Prompt("Add", "1 and 2"), P.Prompt("add", "1 AND 2 "), P.Prompt("How many legs has a cat?")]
    heldout = [P.Prompt("HOW many legs has a cat?")]
    kept = P.deduplicate(prompts, exclude=heldout)
    assert kept == [prompts[0], prompts[2], prompts[3]]
    assert P.deduplicate(kept) == kept                                   # nothing else is dropped
    train, held = P.split_heldout(P.deduplicate(prompts + prompts), 1)  # deduplicated before the split:
    assert not {p.text.lower() for p in train} & {p.text.lower() for p in held}   # no held-out prompt trained on


def test_patience_and_dedup_options_reach_the_cli_and_need_distillation():
    import argparse

    from lorasuite_core.pipeline.options import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, MigrationOptions)
    options = from_arguments(parser.parse_args(["--route", "distill", "--lft-patience", "1", "--lft-epochs", "3",
                                                "--lft-dedup"]), MigrationOptions)
    assert options.lft_patience == 1 and options.lft_dedup and options.lft_epochs == 3
    assert MigrationOptions().lft_patience is None and MigrationOptions().lft_dedup is False
    with pytest.raises(LorasuiteError, match="lft_patience.*distill"):
        from_arguments(parser.parse_args(["--lft-patience", "1"]), MigrationOptions)


def test_stage_keys_change_with_the_new_options_and_not_at_their_defaults():
    from types import SimpleNamespace

    from lorasuite_core.pipeline.plans import _distill_key_parts

    plan = SimpleNamespace(old_identity="old", stage_keys={"vocabulary": "v"})
    base = dict(lft_mode="distill", lft_prompts="task:arithmetic:train:40")
    parts = lambda **o: _distill_key_parts(plan, "adapter", MigrationOptions(**base, **o), "teacher-key")
    default = parts()
    # the parts of a run without the new options, exactly as before they existed (cached entries stay valid)
    assert set(default) == {"lft_mode", "distill_version", "teacher", "prompts", "seeds", "kl_weight", "heldout_n",
                            "heldout", "vocabulary"}
    assert parts(lft_patience=None, lft_dedup=False) == default
    assert parts(lft_patience=1) == {**default, "patience": 1} and parts(lft_dedup=True) == {**default, "dedup": True}


def test_patience_and_dedup_through_the_stage_graph(pair, tmp_path):
    """Options -> stage key -> distill stage -> report: the per-epoch scores and the dropped duplicates."""
    from lorasuite_core.pipeline import pair_stages, stages
    from lorasuite_core.pipeline.options import AnalysisOptions

    lines = [s.instruction for s in generate_problems(10, "train", seed=2)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines + [lines[0].upper(), "  " + lines[3]]) + "\n")
    store = str(pair["migrated"].parent / "store")        # the pair's analysis, already computed
    common = dict(lft_mode="distill", lft_prompts=str(tmp_path / "prompts.txt"), lft_samples=8, gate_prompts=4,
                  lft_lr=1e-5, lft_epochs=2, fidelity=False)
    try:
        report = stages.migrate_in_process(pair["old"], pair["new"], pair["adapter"], tmp_path / "out",
                                           MigrationOptions(**common, lft_patience=1, lft_dedup=True),
                                           AnalysisOptions(max_calibration_tokens=256), cache_root=store)
        plain = stages.migrate_in_process(pair["old"], pair["new"], pair["adapter"], tmp_path / "plain",
                                          MigrationOptions(**common), AnalysisOptions(max_calibration_tokens=256),
                                          cache_root=store)
    finally:
        pair_stages.clear_memo()
    lft = report["light_finetune"]
    # the first 8 + 4 prompts are read, 2 of them repeats: 10 left, 4 held out, 6 trained on (not replaced)
    assert lft["duplicate_prompts_dropped"] == 2 and lft["n_prompts"] == 6 and lft["n_heldout"] == 4
    stop = lft["early_stopping"]
    assert stop["patience"] == 1 and stop["max_epochs"] == 2 and 1 <= stop["epochs_run"] <= 2
    assert [e["epoch"] for e in stop["epochs"]] == list(range(1, stop["epochs_run"] + 1))
    assert lft["teacher_agreement_after"] == stop["epochs"][stop["best_epoch"] - 1]["agreement"]
    assert "early_stopping" not in plain["light_finetune"] and "duplicate_prompts_dropped" not in plain["light_finetune"]
    assert report["steps"]["lft"]["cache"] == plain["steps"]["lft"]["cache"] == "computed"   # two keys
