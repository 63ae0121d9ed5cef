"""Operations findings 1-4 (issue 19): every subcommand's outputs are checked like ``migrate``'s,
published outputs are verified, killed runs leave no temporary directory, modes follow the umask.

The CLI runs in process (``flows.cli.main``) on tiny models: a Llama with a trained tokenizer for
``train``/``eval``, the synthetic pair of :mod:`lorasuite_core.testing.upgrade` for ``migrate``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from lorasuite_core.io import completion, outputs, publish, tempdirs
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from tests.tiny_llama import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("ops-model"))


def listing(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("lorasuite: error: "), lines
    return lines[-1]


def train(model, out, *extra):
    return main(["-q", "train", "--model", str(model), "--samples", "4", "--batch-size", "4", "--rank", "2",
                 "--targets", "q_proj,v_proj", "--output", str(out), *extra])


def evaluate(model, out, *extra):
    return main(["-q", "eval", "--model", str(model), "--samples", "2", "--max-new-tokens", "2",
                 "--output", str(out), *extra])


# --------------------------------------------------------------------------- finding 1: eval --output


def test_eval_output_is_never_an_input_and_replaces_only_our_result(model, tmp_path, capsys):
    before = listing(model)
    for extra in ((), ("--overwrite",)):
        assert evaluate(model, model / "config.json", *extra) == 2
        assert "inside the model" in error_line(capsys)
        assert evaluate(model, model, *extra) == 2
        assert "model or a directory above it" in error_line(capsys)
    assert listing(model) == before

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}\n')
    for extra in ((), ("--overwrite",)):
        assert evaluate(model, foreign, *extra) == 2
        assert "not written by lorasuite" in error_line(capsys)
    assert foreign.read_text() == '{"mine": true}\n'

    out = tmp_path / "result.json"
    assert evaluate(model, out) == 0
    first = json.loads(out.read_text())
    assert first[outputs.FILE_FORMAT_KEY] == "lorasuite.evaluation/v1" and first["n"] == 2
    capsys.readouterr()
    assert evaluate(model, out) == 2
    assert "--overwrite" in error_line(capsys)
    assert evaluate(model, out, "--overwrite") == 0
    assert json.loads(out.read_text())["n"] == 2


# --------------------------------------------------------------------------- finding 2: train --overwrite


def test_train_publishes_atomically_and_overwrite_replaces_only_ours(model, tmp_path, capsys):
    foreign = make_random_lora_adapter(make_tiny_model_dir("llama", tmp_path / "other", seed=1),
                                       tmp_path / "someone-elses-adapter", rank=2, alpha=4, seed=2)
    before = listing(foreign)
    for extra in ((), ("--overwrite",)):
        assert train(model, foreign, *extra) == 2
        assert "not written by lorasuite" in error_line(capsys)
    assert listing(foreign) == before

    out = tmp_path / "adapter"
    assert train(model, out) == 0
    published = listing(out)
    assert {"adapter_config.json", "adapter_model.safetensors", completion.COMPLETE_MARKER} <= set(published)
    assert outputs.output_state(out) == "complete"
    assert json.loads(published["training_summary.json"])["result"]["out_dir"] == str(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.")]      # no staging left
    capsys.readouterr()
    assert train(model, out) == 2
    assert "--overwrite" in error_line(capsys)
    assert train(model, out, "--overwrite", "--seed", "1") == 0
    assert listing(out)["adapter_model.safetensors"] != published["adapter_model.safetensors"]
    assert outputs.output_state(out) == "complete"


# --------------------------------------------------------------------------- finding 3: outputs vs inputs


def test_no_subcommand_writes_into_or_above_an_input(model, tmp_path, capsys, monkeypatch):
    before = listing(model)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "1 + 1?", "input": "", "output": "2. The answer is 2.",
                                "answer": "2"}) + "\n")
    cases = [(model, "model or a directory above it"), (model / "adapter", "inside the model"),
             (model.parent, "model or a directory above it"), (data, "training data")]
    for output, needle in cases:
        for extra in ((), ("--overwrite",)):
            assert train(model, output, "--data", str(data), *extra) == 2, output
            assert needle in error_line(capsys)
    assert listing(model) == before and not (model / "adapter").exists()

    # models fetch: a cache directory holding someone else's files is refused before any download
    cache = tmp_path / "models"
    (cache / "gemma3-270m").mkdir(parents=True)
    (cache / "gemma3-270m" / "thesis.tex").write_text("precious")
    assert main(["-q", "models", "fetch", "gemma3-270m", "--cache-dir", str(cache)]) == 2
    assert "did not write" in error_line(capsys)
    assert listing(cache) == {"gemma3-270m/thesis.tex": b"precious"}

    # demo: a working directory it did not make is never emptied; nor is the current directory
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    assert main(["-q", "demo", "--synthetic", "--workdir", str(workdir)]) == 2
    assert "not made by lorasuite demo" in error_line(capsys)
    monkeypatch.chdir(workdir)
    assert main(["-q", "demo", "--synthetic", "--workdir", "."]) == 2
    assert "current directory" in error_line(capsys)
    assert listing(workdir) == {"keep.txt": b"mine"}
    # an earlier version's real-demo directory (only the demo's own names, no marker) is reused, never emptied
    from flows.demo import DEMO_MARKER, claim_workdir

    earlier = tmp_path / "runs-demo"
    (earlier / "old-adapter-200").mkdir(parents=True)
    (earlier / "old-adapter-200" / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(outputs.UnsafeOutputError, match="not made by lorasuite demo"):
        claim_workdir(earlier, fresh=True)
    assert claim_workdir(earlier, fresh=False) == earlier
    assert listing(earlier) == {"old-adapter-200/adapter_model.safetensors": b"weights",
                                DEMO_MARKER: b'{"lorasuite_format": "lorasuite.demo-workdir/v1"}\n'}


# --------------------------------------------------------------------------- finding 4: verification


def _publish(tmp_path: Path, dest: Path) -> None:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    (source / "adapter_config.json").write_text('{"r": 4}')
    (source / "adapter_model.safetensors").write_bytes(os.urandom(8192))
    publish.publish_dir_atomic(source, dest, overwrite=True)


def test_manifest_must_list_files_and_publications_are_sha256_verified(model, tmp_path, capsys, caplog):
    dest = tmp_path / "out"
    _publish(tmp_path, dest)
    assert outputs.output_state(dest) == "complete"
    # corrupted in place, same size: only the sha256 tells
    with open(dest / "adapter_model.safetensors", "r+b") as handle:
        handle.seek(100)
        handle.write(os.urandom(4096))
    assert completion.verify_local_dir(dest) == f"adapter_model.safetensors does not match its sha256 in {completion.COMPLETE_MARKER}"
    assert outputs.output_state(dest) == "corrupt"
    # a manifest listing no files vouches for nothing
    _publish(tmp_path, dest)
    marker = json.loads((dest / completion.COMPLETE_MARKER).read_text())
    (dest / completion.COMPLETE_MARKER).write_text(json.dumps({**marker, "files": []}))
    assert completion.verify_local_dir(dest) == f"{completion.COMPLETE_MARKER} lists no files"
    assert outputs.output_state(dest) == "corrupt"
    # ... also in the stage store: the entry is recomputed, not trusted
    store = StageStore(str(tmp_path / "store"))
    first = store.run("demo", "k" * 16, lambda out: {"answer": 1})
    entry = Path(first.uri)
    marker = json.loads((entry / completion.COMPLETE_MARKER).read_text())
    (entry / completion.COMPLETE_MARKER).write_text(json.dumps({**marker, "files": []}))
    assert store.run("demo", "k" * 16, lambda out: {"answer": 2}).facts == {"answer": 2}

    # a plain rerun of train replaces a corrupt publication of ours, with one warning
    out = tmp_path / "adapter"
    assert train(model, out) == 0
    with open(out / "adapter_model.safetensors", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\0" * 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train(model, out) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "no longer matches" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert outputs.output_state(out) == "complete"


def test_corrupt_publication_is_not_skipped_by_a_fleet(tmp_path, capsys, prefect_server):
    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    old = make_tiny_model_dir("llama", tmp_path / "old", seed=21)
    new = upgrade_model_dir(old, tmp_path / "new", UpgradeSpec(permute_heads=True))
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=4, alpha=8, seed=22)
    _publish(tmp_path, tmp_path / "out" / "bot")
    with open(tmp_path / "out" / "bot" / "adapter_model.safetensors", "r+b") as handle:
        handle.write(b"x" * 16)
    manifest = tmp_path / "fleet.json"
    manifest.write_text(json.dumps({"old_model": str(old), "new_model": str(new), "output_root": str(tmp_path / "out"),
                                    "analysis": {"max_calibration_tokens": 256},
                                    "adapters": [{"name": "bot", "adapter": str(adapter)}]}))
    assert main(["-q", "migrate-fleet", "--manifest", str(manifest), "--cache-root", str(tmp_path / "cache")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["published"] == ["bot"] and summary["skipped"] == []
    assert outputs.output_state(tmp_path / "out" / "bot") == "complete"
    assert "migration_report.json" in listing(tmp_path / "out" / "bot")


@pytest.mark.parametrize("case", ["rank", "int8"])
def test_adapter_contradicting_its_config_is_one_line(tmp_path, capsys, case):
    old = make_tiny_model_dir("llama", tmp_path / "old", seed=3)
    adapter = make_random_lora_adapter(old, tmp_path / "adapter", rank=4, alpha=8, seed=4)
    if case == "rank":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 100000}))
        needle = "says r = 100000"
    else:
        tensors = load_file(adapter / "adapter_model.safetensors")
        save_file({k: (v * 100).to(torch.int8) for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
        needle = "int8, not floating point"
    out = tmp_path / "out"
    code = main(["-q", "migrate", "--old-model", str(old), "--new-model", str(old), "--adapter", str(adapter),
                 "--output", str(out), "--no-lft"])
    assert code == 2
    line = error_line(capsys)
    assert needle in line and "rank 4" in line if case == "rank" else needle in line, line
    assert not out.exists()


def test_temporary_directories_of_killed_runs_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"lorasuite-prefect-{dead.pid}-abc123"
    alive = tmp_path / f"lorasuite-prefect-{os.getppid()}-def456"   # a live process: another run
    foreign = tmp_path / f"someone-{dead.pid}-x"
    for path in (stale, alive, foreign):
        path.mkdir()
        (path / "prefect.db").write_bytes(b"x" * 1024)
    assert tempdirs.clean_stale(tmp_path) == 1
    assert not stale.exists() and alive.exists() and foreign.exists()
    # the embedded server's home is named so that the next run can tell it is stale
    made = tempdirs.make_private_tempdir("prefect")
    try:
        assert made.name.startswith(f"lorasuite-prefect-{os.getpid()}-") and tempdirs._NAME.match(made.name)
    finally:
        shutil.rmtree(made)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_file_modes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        source = tmp_path / "source"
        source.mkdir()
        save_file({"a": torch.zeros(2)}, source / "adapter_model.safetensors")   # safetensors writes 0600
        (source / "adapter_config.json").write_text("{}")
        publish.publish_dir_atomic(source, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {name: 0o666 & ~umask for name in
                     ("adapter_model.safetensors", "adapter_config.json", completion.COMPLETE_MARKER)}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
