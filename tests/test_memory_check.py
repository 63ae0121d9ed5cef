"""The pre-run memory check (pipeline.memory_check): parameter counts from the safetensors headers against the
loaded tensors, which stages count and how, and the CLI's one-line refusal before any analysis."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline import memory_check as M
from lorasuite_core.pipeline.options import MigrationOptions
from tests.test_bad_input import assert_fails_cleanly, pair, run_migrate  # noqa: F401 (pair: the fixture)


def test_parameter_count_reads_the_headers(pair, tmp_path):
    _, old, new, _ = pair
    for model in (old, new):
        tensors = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        assert M.parameter_count(str(model)) == sum(t.numel() for t in tensors.values()) > 0
    assert M.parameter_count(str(tmp_path)) is None and M.parameter_count("org/hub-model") is None
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert M.parameter_count(str(tmp_path)) is None       # the stage that reads it names the corruption


def test_the_need_is_the_largest_stage(pair):
    _, old, new, _ = pair
    o, n = (M.parameter_count(str(m)) * M.CPU_BYTES for m in (old, new))
    one, both = max(o, n) + M.OVERHEAD, o + n + M.OVERHEAD
    transfer_only = MigrationOptions(fidelity=False)
    assert M.whole_model_stages(transfer_only) == []
    M.check_memory(str(old), str(new), transfer_only, available=0)            # streams: nothing to check
    fidelity = MigrationOptions()
    M.check_memory(str(old), str(new), fidelity, available=one)
    with pytest.raises(LorasuiteError, match=r"^fidelity loads whole models in float32 .* drop it \(--no-fidelity\)"):
        M.check_memory(str(old), str(new), fidelity, available=one - 1)
    distill = MigrationOptions(route="distill", lft_prompts="task:arithmetic:train:20")
    M.check_memory(str(old), str(new), distill, available=both)
    with pytest.raises(LorasuiteError) as refused:       # fidelity fits, student + teacher do not
        M.check_memory(str(old), str(new), distill, available=both - 1)
    message = str(refused.value)
    assert message.startswith("distillation (student and teacher at once) loads") and "fidelity" not in message
    assert "--no-lft / --route transfer" in message


def test_the_check_can_be_switched_off(pair, monkeypatch):
    _, old, new, _ = pair
    monkeypatch.setenv("LORASUITE_MEMORY_CHECK", "0")
    M.check_memory(str(old), str(new), MigrationOptions(), available=0)


def test_the_cli_refuses_before_any_analysis(pair, tmp_path, capsys, monkeypatch):
    root, old, new, adapter = pair
    monkeypatch.setattr(M, "available_bytes", lambda: M.OVERHEAD)
    out = tmp_path / "out"
    code = run_migrate(old, new, adapter, out, "--cache-root", str(tmp_path / "store"))
    assert_fails_cleanly(capsys, code, out, "fidelity loads whole models in float32", "--no-fidelity",
                         "LORASUITE_MEMORY_CHECK=0")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("_stage.json"))
    assert run_migrate(old, new, adapter, out, "--no-fidelity", "--cache-root", str(tmp_path / "store")) == 0


def test_auto_counts_both_models_only_where_the_lft_distils(pair):
    _, old, new, _ = pair
    o, n = (M.parameter_count(str(m)) * M.CPU_BYTES for m in (old, new))
    one, both = max(o, n) + M.OVERHEAD, o + n + M.OVERHEAD
    scored = MigrationOptions(route="auto", fidelity=False, eval_data="task:arithmetic:test:8")
    assert [both for _, _, both in M.whole_model_stages(scored)] == [False, False]   # route scoring, evaluation
    M.check_memory(str(old), str(new), scored, available=one)
    distilled = MigrationOptions(route="auto", fidelity=False, lft_mode="distill",
                                 lft_prompts="task:arithmetic:train:20")
    with pytest.raises(LorasuiteError, match=r"^distillation \(student and teacher at once\) loads"):
        M.check_memory(str(old), str(new), distilled, available=both - 1)
