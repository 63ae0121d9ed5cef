"""``generation_dtype``: the pipeline's greedy generation (the teacher's answers, distillation's held-out student
answers, the gate's and the route's new-model answers) runs in the asked dtype, every key that reads the teacher
changes with it, and a fleet whose entries ask for different dtypes generates once per dtype.

The dtype of every generation load is read where the pipeline loads a model for generation
(``evaluation.load_causal_lm``, called by ``load_for_generation``), with the model each load was for."""
from __future__ import annotations

import pytest

from lorasuite_core.pipeline import pair_stages, plans
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.training import distill as D
from lorasuite_core.training import evaluation
from lorasuite_core.training import prompts as P
from lorasuite_core.training.config import default_lft_config
from lorasuite_core.training.devices import cpu_supports_bf16
from lorasuite_core.training.task_data import generate_problems
from tests.distill_setup import build_exact_fleet, build_exact_pair

SMALL = AnalysisOptions(max_calibration_tokens=256)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    yield build_exact_fleet(tmp_path_factory.mktemp("generation-dtype"), range(60, 63))
    pair_stages.clear_memo()


@pytest.fixture
def loads(monkeypatch):
    """(model directory name, dtype name) of every generation load."""
    seen, original = [], evaluation.load_causal_lm

    def recorded(model_dir, *args, dtype="auto", **kwargs):
        model = original(model_dir, *args, dtype=dtype, **kwargs)
        seen.append((str(model_dir).rsplit("/", 1)[-1], str(next(model.parameters()).dtype).replace("torch.", "")))
        return model

    monkeypatch.setattr(evaluation, "load_causal_lm", recorded)
    return seen


def distilling(pair, **update) -> MigrationOptions:
    base = {"lft_mode": "distill", "lft_prompts": str(pair["prompts"]), "lft_samples": 2, "lft_lr": 1e-5,
            "gate_prompts": 1, "fidelity": False}
    return MigrationOptions(**{**base, **update}).check_single()


def run(pair, tmp_path, options: dict[str, MigrationOptions], outputs: str = "out") -> list[EntryRun]:
    entries = [EntryRun(name=name, adapter=str(pair["adapters"][name]), output=str(tmp_path / outputs / name),
                        options=o) for name, o in options.items()]
    Runner(InProcess(), StageStore.at(str(tmp_path / "store")).root).run(str(pair["old"]), str(pair["new"]), SMALL,
                                                                         entries)
    for e in entries:
        assert e.status == "published", e.error
    return entries


def test_auto_is_bf16_where_the_cpu_multiplies_in_bf16_and_the_teacher_key_holds_the_dtype():
    auto, fp32, bf16 = (MigrationOptions(generation_dtype=d) for d in ("auto", "float32", "bfloat16"))
    assert plans.generation_dtype(fp32) == "float32" and plans.generation_dtype(bf16) == "bfloat16"
    assert plans.generation_dtype(auto) == ("bfloat16" if cpu_supports_bf16() else "float32")
    assert plans.teacher_compute(fp32) == "float32@cpu" != plans.teacher_compute(bf16) == "bfloat16@cpu"
    with pytest.raises(ValueError, match="generation_dtype"):
        MigrationOptions(generation_dtype="float16")


def test_every_generation_runs_in_the_asked_dtype_and_the_keys_follow_it(pair, tmp_path, loads):
    """bf16: the teacher (old model), distillation's held-out answers before and after and the gate's bare answers
    (new model) load in bf16; only distillation's KL teacher loads in the training dtype (float32 here).  The same
    migration in float32 loads nothing in bf16, and no key that reads the teacher is shared between the two."""
    asked = {d: distilling(pair, generation_dtype=d, gate=True, gate_margin=-1.0) for d in ("bfloat16", "float32")}
    [bf16] = run(pair, tmp_path / "bf16", {"t0": asked["bfloat16"]})
    assert bf16.out["teacher"].facts["dtype"] == "bfloat16"
    assert loads == [("old", "bfloat16"),                       # the teacher stage's answers
                     ("old", "float32"),                        # distillation's KL teacher (training dtype)
                     ("new", "bfloat16"), ("new", "bfloat16"),  # held-out answers before and after
                     ("new", "bfloat16")]                       # the gate: the bare new model (the student's reused)
    loads.clear()
    [fp32] = run(pair, tmp_path / "bf16", {"t0": asked["float32"]}, "out-fp32")        # the same store
    assert fp32.out["teacher"].facts["dtype"] == "float32" and not fp32.out["teacher"].reused
    assert {dtype for _, dtype in loads} == {"float32"} and len(loads) == 5
    for key in ("teacher_key", "gate_key"):
        assert getattr(bf16.plan, key) != getattr(fp32.plan, key), key
    assert bf16.plan.lft.key != fp32.plan.lft.key and bf16.plan.migrated_key == fp32.plan.migrated_key


def test_auto_route_generates_in_the_asked_dtype(pair, tmp_path, loads):
    """``--route auto`` scores its candidates on new-model answers in the generation dtype (the bare model and the
    candidates without distillation's own answers: here the transfer); fidelity's teacher-forced scoring stays
    float32."""
    [entry] = run(pair, tmp_path, {"t1": distilling(pair, route="auto", fidelity=True, generation_dtype="bfloat16",
                                                    gate_margin=-1.0)})
    assert entry.out["route"].facts["chosen"] is not None
    assert loads == [("old", "bfloat16"),                                          # the teacher stage
                     ("old", "float32"), ("new", "bfloat16"), ("new", "bfloat16"),  # distill: KL teacher, before/after
                     ("old", "float32"), ("new", "bfloat16"), ("new", "bfloat16"),  # fresh-distill: the same
                     ("old", "float32"), ("new", "float32"),                        # fidelity's scoring
                     ("new", "bfloat16")]   # the route: the transfer candidate and the bare model (students reused)


def test_a_fleet_generates_its_teachers_once_per_dtype(pair, tmp_path, monkeypatch):
    seen, original = [], D.teacher_completions

    def counted(model_dir, by_adapter, **kwargs):
        seen.append((kwargs["dtype"], sorted(str(adapter) for adapter, _ in by_adapter.values())))
        return original(model_dir, by_adapter, **kwargs)

    monkeypatch.setattr(D, "teacher_completions", counted)
    options = {"t0": distilling(pair, generation_dtype="float32"), "t1": distilling(pair, generation_dtype="bfloat16"),
               "t2": distilling(pair, generation_dtype="bfloat16")}
    entries = run(pair, tmp_path, options)
    a = {name: str(path) for name, path in pair["adapters"].items()}
    assert seen == [("float32", [a["t0"]]), ("bfloat16", sorted([a["t1"], a["t2"]]))]
    assert [e.out["teacher"].facts["dtype"] for e in entries] == ["float32", "bfloat16", "bfloat16"]
    assert [e.out["teacher"].facts["adapters_in_call"] for e in entries] == [1, 2, 2]


def test_library_distillation_generates_in_its_generation_dtype(tmp_path, loads):
    """``distill()`` without given answers: the teacher answers in ``generation_dtype`` (a load of its own when that
    differs from the training dtype the KL teacher loads in), and so does the student before and after; unset, all
    of it in the training dtype, one teacher load."""
    exact = build_exact_pair(tmp_path)
    prompts, heldout = P.split_heldout(P.prompts_from_samples(generate_problems(5, "train", seed=3)), 2, seed=0)
    train = default_lft_config(lr=1e-5, show_progress=False)
    loads.clear()
    for dtype, expected in (("bfloat16", [("old", "float32"), ("old", "bfloat16"), ("new", "bfloat16"),
                                          ("new", "bfloat16")]),
                            (None, [("old", "float32"), ("new", "float32"), ("new", "float32")])):
        D.distill(exact["old"], exact["adapter"], exact["new"], exact["migrated"], tmp_path / f"out-{dtype}", prompts,
                  heldout=heldout, config=D.DistillConfig(max_new_tokens=8, train=train, generation_dtype=dtype))
        assert loads == expected, dtype
        loads.clear()
