"""The teacher stage over a fleet: one batched generation for every adapter of one old model, each adapter's answers
in its own entry, published adapters bit-identical to migrating each adapter alone, and the entries reused; the
evaluation rows of a fleet that share a base model on one model load, each row what it is alone.

Three random adapters of one tiny model (different teachers: the same prompt gets different answers), an exact
upgrade, distilled LFT on one prompt file.  The fleet runs on the in-process runner over one store; each adapter is
then migrated alone over a store of its own, so its teacher answers are generated again, one adapter at a time.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.pipeline import graph, pair_stages
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.training import distill as D
from lorasuite_core.training.heldout import HELDOUT, TEACHER_TARGETS, read_heldout
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import build_exact_fleet

SMALL = AnalysisOptions(max_calibration_tokens=256)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    found = build_exact_fleet(tmp_path_factory.mktemp("teacher-batch"), range(40, 43))
    found["options"] = MigrationOptions(lft_mode="distill", lft_prompts=str(found["prompts"]), lft_samples=2,
                                        lft_lr=1e-5, gate_prompts=1, fidelity=False).check_single()
    root = found["root"]
    seen, original = [], D.teacher_completions
    D.teacher_completions = lambda model_dir, by_adapter, **kw: seen.append(by_adapter) or original(model_dir,
                                                                                                  by_adapter, **kw)
    try:
        found["entries"] = run_fleet(found, root / "store", "fleet")         # the fleet, once for the module
    finally:
        D.teacher_completions = original
    found["calls"] = [sorted(str(adapter) for adapter, _ in call.values()) for call in seen]
    yield found
    pair_stages.clear_memo()


def run_fleet(fleet, store, outputs: str, names=None, options=None) -> list[EntryRun]:
    entries = [EntryRun(name=name, adapter=str(fleet["adapters"][name]), output=str(fleet["root"] / outputs / name),
                        options=options or fleet["options"]) for name in names or fleet["adapters"]]
    Runner(InProcess(), StageStore.at(str(store)).root).run(str(fleet["old"]), str(fleet["new"]), SMALL, entries)
    for e in entries:
        assert e.status == "published", e.error
    return entries


@pytest.fixture
def calls(monkeypatch):
    """The adapters of every teacher generation call (each call: one old-model load holding them all)."""
    seen, original = [], D.teacher_completions

    def counted(model_dir, prompts_by_adapter, **kwargs):
        seen.append(sorted(str(adapter) for adapter, _ in prompts_by_adapter.values()))
        return original(model_dir, prompts_by_adapter, **kwargs)

    monkeypatch.setattr(D, "teacher_completions", counted)
    return seen


def tensors(path):
    return load_file(path / "adapter_model.safetensors")


def test_a_fleet_generates_its_teachers_in_one_call_and_publishes_what_each_alone_would(fleet, calls):
    root, entries = fleet["root"], fleet["entries"]
    assert fleet["calls"] == [sorted(str(a) for a in fleet["adapters"].values())]     # one call, all three adapters
    store = StageStore.at(str(root / "store"))
    heldout = {e.name: read_heldout(store.local_dir(e.out["teacher"].uri) / HELDOUT) for e in entries}
    assert all(e.out["teacher"].facts["adapters_in_call"] == 3 for e in entries)
    assert len({tuple(c.text for c in teacher) for _, teacher, _ in heldout.values()}) > 1   # different teachers

    alone_store = StageStore.at(str(root / "store-alone"))
    for e in entries:                       # each alone, in another store: its teacher generated again, by itself
        calls.clear()
        [alone] = run_fleet(fleet, alone_store.root, "alone", names=[e.name])
        assert calls == [[str(fleet["adapters"][e.name])]]
        assert alone.plan.teacher_key == e.plan.teacher_key and alone.out["teacher"].facts["adapters_in_call"] == 1
        mine = alone_store.local_dir(alone.out["teacher"].uri)
        for name in (HELDOUT, TEACHER_TARGETS):       # the same answers, text and token ids
            assert (mine / name).read_bytes() == (store.local_dir(e.out["teacher"].uri) / name).read_bytes(), name
        together, by_itself = tensors(root / "fleet" / e.name), tensors(root / "alone" / e.name)
        assert together.keys() == by_itself.keys()
        assert all(torch.equal(together[k], by_itself[k]) for k in together), e.name     # bit-identical


def test_a_rerun_and_a_single_migration_reuse_the_teacher_entries(fleet, calls, monkeypatch):
    root, first = fleet["root"], fleet["entries"]
    again = run_fleet(fleet, root / "store", "rerun")
    assert calls == []
    assert all(e.out["teacher"].reused and e.out["lft"].reused for e in again)
    assert [e.out["teacher"].uri for e in again] == [e.out["teacher"].uri for e in first]
    [single] = run_fleet(fleet, root / "store", "single", names=["t1"])
    assert calls == [] and single.out["teacher"].reused

    # at most batch_max adapters a call: a new prompt budget (new keys), two adapters a call -> calls of 2 and 1
    monkeypatch.setitem(graph.ENTRY_GRAPH, "teacher", dataclasses.replace(graph.ENTRY_GRAPH["teacher"], batch_max=2))
    options = MigrationOptions(lft=False, gate_prompts=1).check_single()     # fidelity on calibration prompts
    run_fleet(fleet, root / "store", "capped", options=options)
    assert [len(call) for call in calls] == [2, 1]


def test_one_entrys_bad_prompts_fail_that_entry_only(fleet, calls, tmp_path):
    """One adapter's prompts cannot be prepared (one prompt, to be held out): that entry fails at the teacher stage;
    the others of the same call are answered together and published."""
    few = tmp_path / "few.txt"
    few.write_text("What is 1 plus 1?\n")
    bad = fleet["options"].model_copy(update={"lft_prompts": str(few)})
    other = fleet["options"].model_copy(update={"lft_samples": 1})          # new keys: generated in this run
    entries = [EntryRun(name=name, adapter=str(adapter), output=str(tmp_path / "out" / name),
                        options=bad if name == "t0" else other) for name, adapter in fleet["adapters"].items()]
    Runner(InProcess(), StageStore.at(str(fleet["root"] / "store")).root).run(
        str(fleet["old"]), str(fleet["new"]), SMALL, entries)
    status = {e.name: (e.status, e.error) for e in entries}
    assert status["t0"] == ("failed", "teacher: distillation: 1 prompts, but 1 are held out (--gate-prompts) and at "
                                      "least one must be left to train on")
    assert status["t1"][0] == status["t2"][0] == "published"
    assert calls == [sorted(str(fleet["adapters"][name]) for name in ("t1", "t2"))]


def test_a_fleets_evaluation_rows_share_one_load_per_base_model(fleet, tmp_path, monkeypatch):
    """Two adapters with evaluation data: the old model's rows (each adapter's source) in one call, the new model's
    (the bare model, one entry for both adapters, and each migrated adapter) in another; every row's numbers are
    those of the adapter migrated alone with every row evaluated by itself (the stage unbatched)."""
    import json

    from lorasuite_core.training import evaluation_fleet as evaluation

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output,
                                        "answer": s.answer}) + "\n" for s in generate_problems(3, "test", 4)))
    options = MigrationOptions(lft=False, fidelity=False, eval_data=str(data), eval_samples=3).check_single()
    groups, original = [], evaluation.evaluate_adapters
    monkeypatch.setattr(evaluation, "evaluate_adapters",
                        lambda model, samples, adapters, **kw: groups.append(len(adapters)) or original(
                            model, samples, adapters, **kw))
    names = ["t0", "t1"]
    together = run_fleet(fleet, tmp_path / "store", "eval-fleet", names=names, options=options)
    assert sorted(groups) == [2, 3]                  # old: two sources; new: the bare model and two migrated
    monkeypatch.setitem(graph.ENTRY_GRAPH, "eval", dataclasses.replace(graph.ENTRY_GRAPH["eval"], batch=None))
    for e in together:                               # each alone, each row by itself (evaluate, a load per row)
        [alone] = run_fleet(fleet, tmp_path / f"store-{e.name}", "eval-alone", names=[e.name], options=options)
        assert alone.evals.keys() == e.evals.keys() and len(e.evals) == 3 and len(groups) == 2
        for row, facts in e.evals.items():
            assert {k: facts[k] for k in ("accuracy", "correct", "n")} == \
                {k: alone.evals[row][k] for k in ("accuracy", "correct", "n")}, row
    assert together[0].out["eval"][1].key == together[1].out["eval"][1].key      # the bare row, one entry
