"""The route chosen per adapter (``--route``): the choice rule on numbers, then ``auto`` on constructed pairs where one
route is known to be worse, the fresh start (B = 0), and the route in the report, the migrate summary and the
fleet summary cell.

* Exact upgrade (heads and neurons permuted, extra neurons) with prompts to distil on: the transfer is exact
  (F = 1), the fresh LoRA distilled at a tiny learning rate stays near the bare model; auto publishes the transfer.
* Same shapes and vocabulary, heads permuted: copy is eligible but wrong (F < 1), the transfer exact: auto
  publishes the transfer although copy is cheaper.  The identical model: copy is exact and cheapest: auto copies.
* An adapter that changes nothing (B = 0) clears no gate: the entry fails with the best candidate's numbers and
  nothing is published.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.models.writing import REPORT_NAME
from lorasuite_core.pipeline import pair_stages
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.routes import candidate_stages
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.pipeline.stages import migrate_in_process
from lorasuite_core.testing.adapter import make_random_lora_adapter, zeroed_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.training.gate import gate_decision
from lorasuite_core.training.route import (FIDELITY_TOLERANCE, Candidate, RouteFailed, choose, discordant,
                                           sign_test_p)
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import EXACT

SMALL = AnalysisOptions(max_calibration_tokens=256)


def candidate(route: str, agreement: float, fidelity: float | None, bare: float = 0.25) -> Candidate:
    return Candidate(route, gate_decision(agreement, bare, n=4, margin=0.05), fidelity)


def test_the_choice_rule_on_numbers():
    # equal agreement, fidelity within the tolerance: the cheapest
    chosen, why = choose([candidate("copy", 1.0, 0.995), candidate("transfer", 1.0, 1.0)])
    assert chosen.route == "copy" and "also cleared: transfer" in why
    # a costlier route wins only outside the tolerance, or on agreement
    assert choose([candidate("transfer", 1.0, 0.5), candidate("distill", 1.0, 0.9)])[0].route == "distill"
    # one prompt more of 4 is not evidence: the fidelity decides
    assert choose([candidate("transfer", 0.75, 1.0), candidate("distill", 1.0, 0.1)])[0].route == "transfer"
    # below the gate never wins, whatever its fidelity
    chosen, why = choose([candidate("transfer", 0.25, 1.0), candidate("fresh-distill", 0.5, 0.2)])
    assert chosen.route == "fresh-distill" and "below the gate: transfer" in why
    # no fidelity (no gap to close): agreement, then cost
    assert choose([candidate("transfer", 1.0, None), candidate("distill", 1.0, None)])[0].route == "transfer"
    with pytest.raises(RouteFailed, match=r"^route auto: no candidate clears the quality gate; the best, distill: "
                                          r"teacher agreement 0\.250 \(bare new model 0\.250, margin 0\.05, n=4\), "
                                          r"fidelity 0\.300$"):
        choose([candidate("transfer", 0.25, 0.1), candidate("distill", 0.25, 0.3)])


def flagged(route: str, flags: str, fidelity: float | None) -> Candidate:
    agrees = tuple(ch == "1" for ch in flags)
    return Candidate(route, gate_decision(sum(agrees) / len(agrees), 0.0, n=len(agrees), margin=0.05), fidelity, agrees)


def test_a_costlier_route_needs_significantly_more_agreement_or_more_fidelity():
    assert sign_test_p(5, 0) == pytest.approx(0.5 ** 5) and sign_test_p(6, 1) == pytest.approx(8 / 128)
    assert sign_test_p(0, 3) == 1.0
    cheap = flagged("transfer", "1111" "1111" "0000" "0000", 0.9)
    # alone agrees on 5 prompts where the cheaper misses, never the reverse: p = 1/32, it wins despite less fidelity
    assert choose([cheap, flagged("distill", "1111" "1111" "1111" "1000", 0.5)])[0].route == "distill"
    # 6 against 1 (the same agreement, 13 of 16): p = 1/16, not significant; the fidelity is lower, so the cheaper
    assert choose([cheap, flagged("distill", "1111" "1110" "1111" "1100", 0.5)])[0].route == "transfer"
    # ... and higher by more than the tolerance: the costlier
    assert choose([cheap, flagged("distill", "1111" "1110" "1111" "1100", 0.9 + FIDELITY_TOLERANCE + 0.01)])[0].route \
        == "distill"
    # significantly worse: its fidelity does not matter
    assert choose([cheap, flagged("distill", "0000" "0111" "0000" "0000", 1.0)])[0].route == "transfer"
    # the discordant prompts, not the totals: both agree on 8, on different prompts (8 against 8)
    assert discordant(flagged("distill", "0000" "0000" "1111" "1111", None), cheap) == (8, 8)
    # without flags: the count difference, all on one side
    assert discordant(candidate("distill", 1.0, None), candidate("transfer", 0.25, None)) == (3, 0)
    assert flagged("distill", "10", None).to_dict()["agrees"] == "10"
    # cheapest first, each costlier one against the current choice
    copy = flagged("copy", "1111" "1111" "1000" "0000", 0.8)
    assert choose([flagged("fresh-distill", "1111" "1111" "1111" "1111", 0.8), cheap, copy])[0].route == "fresh-distill"


def test_distill_routes_distil_and_refuse_contradictions():
    assert MigrationOptions(route="distill").lft_mode == "distill"
    assert MigrationOptions(route="fresh-distill", lft_prompts="p.txt").runs_lft
    assert MigrationOptions().route == "transfer"                                # today's behaviour is the default
    with pytest.raises(LorasuiteError, match="route distill distils from the teacher; lft_mode labelled"):
        from lorasuite_core.pipeline.options import validate
        validate(MigrationOptions, {"route": "distill", "lft_mode": "labelled"})
    with pytest.raises(LorasuiteError, match="route fresh-distill needs prompts"):
        MigrationOptions(route="fresh-distill").check_single()
    with pytest.raises(LorasuiteError, match="route auto .* needs held-out prompts"):
        MigrationOptions(route="auto").check_single()


def test_candidates_of_each_route():
    distil = {"lft_mode": "distill", "lft_prompts": "p.txt"}
    assert candidate_stages(MigrationOptions(), copy_ok=True) == {"transfer": "migrated"}
    assert candidate_stages(MigrationOptions(lft_data="d.json"), copy_ok=False) == {"transfer": "lft"}
    assert candidate_stages(MigrationOptions(route="distill", lft_prompts="p.txt"), False) == {"distill": "lft"}
    assert candidate_stages(MigrationOptions(route="fresh-distill", lft_prompts="p.txt"), False) == \
        {"fresh-distill": "fresh_lft"}
    assert candidate_stages(MigrationOptions(route="copy"), True) == {"copy": "copy"}
    assert candidate_stages(MigrationOptions(route="auto", eval_data="e.json"), True) == \
        {"copy": "copy", "transfer": "migrated"}
    assert candidate_stages(MigrationOptions(route="auto", lft_data="d.json"), False) == {"transfer": "lft"}
    assert list(candidate_stages(MigrationOptions(route="auto", **distil), True).items()) == \
        [("copy", "copy"), ("transfer", "migrated"), ("distill", "lft"), ("fresh-distill", "fresh_lft")]


def test_only_the_copy_route_opens_the_models_in_the_pre_run_check(monkeypatch, tmp_path):
    from lorasuite_core.pipeline import plans

    opened = []
    monkeypatch.setattr(plans, "artifact_identity", lambda ref, kind, *a: opened.append(ref) or "id")
    monkeypatch.setattr(plans, "copy_refusal", lambda *refs: "the shapes differ: hidden 8 vs 16")
    absent = str(tmp_path / "no-such-model")
    for route, extra in [("transfer", {}), ("distill", {"lft_prompts": "p.txt"}), ("auto", {"eval_data": "e.json"})]:
        plans.check_route(absent, absent, MigrationOptions(route=route, **extra))
    assert opened == []                                       # no model identified, resolved or loaded
    with pytest.raises(LorasuiteError, match="route copy needs the same architecture, shapes and vocabulary, but "
                                             "the shapes differ: hidden 8 vs 16"):
        plans.check_route(absent, absent, MigrationOptions(route="copy"))
    assert opened == [absent, absent]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    adapter = make_random_lora_adapter(old, root / "adapter", rank=4, alpha=8, seed=3)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(s.instruction for s in generate_problems(12, "train", seed=2)) + "\n")
    eval_data = root / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output,
                                             "answer": s.answer}) + "\n" for s in generate_problems(4, "test", 1)))
    yield {"root": root, "old": old, "adapter": adapter, "prompts": prompts, "eval": eval_data}
    pair_stages.clear_memo()


def run_entry(models, new, out, options, adapter=None):
    entry = EntryRun(name=out.name, adapter=str(adapter or models["adapter"]), output=str(out),
                     options=options.check_single())
    pair = Runner(InProcess(), StageStore.at(str(models["root"] / "store")).root).run(
        str(models["old"]), str(new), SMALL, [entry])
    return entry, pair


def test_auto_prefers_the_exact_transfer_to_fresh_distillation(models):
    root = models["root"]
    new = upgrade_model_dir(models["old"], root / "exact", EXACT)
    # float32 generation: an exact upgrade's greedy answers are equal there (bf16 rounds the two widths apart)
    options = MigrationOptions(route="auto", lft_mode="distill", lft_prompts=str(models["prompts"]), lft_samples=8,
                               lft_lr=1e-5, gate_prompts=4, generation_dtype="float32")
    entry, pair = run_entry(models, new, root / "auto", options)
    assert entry.status == "published", entry.error
    assert entry.plan.candidates == {"transfer": "migrated", "distill": "lft", "fresh-distill": "fresh_lft"}
    report = json.loads((root / "auto" / REPORT_NAME).read_text())
    route = report["route"]
    assert route["route"] == "auto" and route["chosen"] == "transfer"
    scored = {c["route"]: c for c in route["candidates"]}
    assert list(scored) == ["transfer", "distill", "fresh-distill"]                  # cheapest first
    assert scored["transfer"]["fidelity"] == pytest.approx(1.0, abs=1e-3)            # exact
    assert scored["transfer"]["teacher_agreement"] == 1.0 and scored["transfer"]["passed"]
    assert scored["transfer"]["agrees"] == "1111"                                    # per held-out prompt
    assert scored["fresh-distill"]["fidelity"] < 0.5                                 # B = 0, barely trained
    assert not scored["fresh-distill"]["passed"]
    assert report["quality_gate"]["passed"] and report["quality_gate"]["student_agreement"] == 1.0
    assert "transfer: teacher agreement 1.000" in route["reason"] and report["steps"]["route"]["cache"] == "computed"
    # the published adapter is the transfer's, byte for byte
    store = StageStore.at(str(root / "store"))
    migrated = load_file(store.local_dir(entry.out["migrated"].uri) / "adapter_model.safetensors")
    published = load_file(root / "auto" / "adapter_model.safetensors")
    assert migrated.keys() == published.keys() and all(torch.equal(migrated[k], published[k]) for k in migrated)
    # fresh-distill started from B = 0 and read distill's teacher completions instead of generating them
    fresh = load_file(store.local_dir(entry.out["fresh"].uri) / "adapter_model.safetensors")
    assert {k for k in fresh if "lora_B" in k} and all(not fresh[k].any() for k in fresh if "lora_B" in k)
    assert all(fresh[k].abs().sum() > 0 for k in fresh if "lora_A" in k)
    assert {k.split(".lora_")[0] for k in fresh} == {k.split(".lora_")[0] for k in migrated}   # same modules
    # both distillations read the one teacher entry (its prompts and completions), neither generates them
    assert entry.out["fresh_lft"].facts["reused_teacher_completions"] is True
    assert entry.out["lft"].facts["reused_teacher_completions"] is True
    assert entry.out["teacher"].facts["n_train"] == 8 and entry.out["teacher"].facts["n_heldout"] == 4
    # the migrate summary (CLI, flows) and the fleet cell carry the route and every candidate's numbers
    from flows.artifacts import _route_cell
    from flows.pipeline import PipelineRun

    summary = PipelineRun.summary(None, entry, pair)
    assert summary["route"] == route and summary["quality_gate"]["passed"]
    cell = _route_cell({"summary": summary})
    assert cell.startswith("auto: transfer (transfer agreement 1.000 F 1.000; distill agreement")
    assert "fresh-distill agreement" in cell and "(below the gate)" in cell
    # a rerun reuses every candidate and the choice
    again, _ = run_entry(models, new, root / "auto-again", options)
    assert all(again.out[s].reused for s in ("migrated", "fresh", "lft", "fresh_lft", "fidelity", "route"))


def test_auto_copies_only_where_the_copy_is_exact(models):
    root = models["root"]
    options = MigrationOptions(route="auto", lft=False, eval_data=str(models["eval"]), gate_prompts=4, gate_margin=0)
    permuted = upgrade_model_dir(models["old"], root / "permuted", UpgradeSpec(permute_heads=True))
    entry, _ = run_entry(models, permuted, root / "auto-permuted", options)
    assert entry.status == "published", entry.error
    route = json.loads((root / "auto-permuted" / REPORT_NAME).read_text())["route"]
    scored = {c["route"]: c for c in route["candidates"]}
    assert list(scored) == ["copy", "transfer"] and route["chosen"] == "transfer"   # eligible, but wrong
    assert scored["transfer"]["fidelity"] == pytest.approx(1.0, abs=1e-3) and scored["copy"]["fidelity"] < 0.9
    same = upgrade_model_dir(models["old"], root / "same", UpgradeSpec())
    entry, _ = run_entry(models, same, root / "auto-same", options)
    report = json.loads((root / "auto-same" / REPORT_NAME).read_text())
    assert report["route"]["chosen"] == "copy"                                      # exact and cheapest
    assert report["route"]["candidates"][0]["fidelity"] == pytest.approx(1.0, abs=1e-6)
    source = load_file(models["adapter"] / "adapter_model.safetensors")
    published = load_file(root / "auto-same" / "adapter_model.safetensors")
    assert all(torch.equal(source[k], published[k]) for k in source) and source.keys() == published.keys()
    config = json.loads((root / "auto-same" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(same)
    # one route asked for: copy as is, listed alone
    report = migrate_in_process(models["old"], same, models["adapter"], root / "copy",
                                MigrationOptions(route="copy", fidelity=False), SMALL, cache_root=str(root / "store"))
    assert report["route"] == {"route": "copy", "chosen": "copy", "reason": "asked for (--route copy)",
                               "candidates": [{"route": "copy"}]}
    assert report["steps"]["copy"]["cache"] == "reused"                             # auto's copy entry
    assert "transfer" not in report["steps"] and "write" not in report["steps"]     # no transfer work


def test_no_candidate_clears_the_gate_publishes_nothing(models):
    root = models["root"]
    zeroed = zeroed_adapter(models["adapter"], root / "zeroed")
    same = root / "same" if (root / "same").exists() else upgrade_model_dir(models["old"], root / "same", UpgradeSpec())
    options = MigrationOptions(route="auto", lft=False, eval_data=str(models["eval"]), gate_prompts=4)
    with pytest.raises(RouteFailed, match=r"^route auto: no candidate clears the quality gate; the best, copy: "
                                          r"teacher agreement 1\.000 \(bare new model 1\.000, margin 0\.05"):
        migrate_in_process(models["old"], same, zeroed, root / "refused", options, SMALL,
                           cache_root=str(root / "store"))
    assert not (root / "refused").exists()
