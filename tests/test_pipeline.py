"""The Prefect pipeline end to end: flows under ``prefect_test_harness``, storage through real S3 HTTP.

One Prefect test server and one set of tiny models serve the whole module (the server start
dominates the cost).  The fleet fixture runs ``migrate-fleet`` once with models, adapters, data,
manifest, stage store and outputs all on a moto S3 server on 127.0.0.1; later tests reuse its
pair analysis.  Failure tests patch one function (a per-layer transfer, an upload) — never
Prefect — and check the published bytes against ``lorasuite_core.transfer.adapter.migrate``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from uuid import UUID

import pytest
import torch
import yaml

from lorasuite_core.pipeline import pair_stages, stages
from lorasuite_core.io import completion, files, materialize, publish, retry, uris
from lorasuite_core.training import task_data
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import ManifestError
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions, validate
from lorasuite_core.pipeline.stages import migrate_in_process
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from tests.exactness import logits_over_shared_vocab, relative_max_error
from tests.s3_server import s3_endpoint  # noqa: F401 - pytest fixture

TOKENS = 256
SMALL = AnalysisOptions(max_calibration_tokens=TOKENS)
ANALYSIS = ("vocabulary", "transfer_matrix", "activations", "cka", "layer_mapping", "head_similarity", "unit_maps")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def harness(prefect_server, tmp_path_factory):
    """The session's Prefect test server; downloads and data caches under this module's tmp."""
    root = tmp_path_factory.mktemp("harness")
    patch = pytest.MonkeyPatch()
    patch.setenv("LORASUITE_DOWNLOAD_DIR", str(root / "materialized"))
    patch.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
    try:
        yield
    finally:
        pair_stages.clear_memo()
        patch.undo()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tiny llama pair (heads permuted, residual rotated, a layer inserted), adapters and data."""
    root = tmp_path_factory.mktemp("pair")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", UpgradeSpec(permute_heads=True, rotate_residual=True, identity_layers=(1,)))
    adapters = {f"a{i}": make_random_lora_adapter(old, root / f"a{i}", rank=4, alpha=8, seed=10 + i) for i in range(4)}
    other = make_tiny_model_dir("llama", root / "other", seed=5, hidden_size=32, head_dim=8)
    adapters["foreign"] = make_random_lora_adapter(other, root / "foreign", rank=2, alpha=4, seed=1)
    task_data.save_jsonl(task_data.generate_problems(4, "train", 0), root / "lft.jsonl")
    task_data.save_jsonl(task_data.generate_problems(2, "test", 0), root / "eval.jsonl")
    return {"root": root, "old": old, "new": new, "adapters": adapters, "cache": root / "cache"}


@pytest.fixture(scope="module")
def fleet_run(harness, s3_endpoint, pair):  # noqa: F811 - fixture
    """migrate-fleet once on S3: three good adapters (one with LFT + evaluation), a missing one, a foreign one."""
    from flows import run_migrate_fleet

    base = s3_endpoint.unique_uri("fleet")
    publish.publish_dir_atomic(pair["old"], f"{base}/models/old")
    publish.publish_dir_atomic(pair["new"], f"{base}/models/new")
    for name, path in pair["adapters"].items():
        publish.publish_dir_atomic(path, f"{base}/adapters/{name}")
    for name in ("lft.jsonl", "eval.jsonl"):
        files.write_bytes_atomic(f"{base}/data/{name}", (pair["root"] / name).read_bytes())
    manifest = {
        "old_model": f"{base}/models/old", "new_model": f"{base}/models/new", "output_root": f"{base}/out",
        "analysis": {"max_calibration_tokens": TOKENS},
        "defaults": {"lft_samples": 4, "eval_samples": 2},
        "adapters": [
            {"name": "a0", "adapter": f"{base}/adapters/a0", "lft_data": f"{base}/data/lft.jsonl",
             "eval_data": f"{base}/data/eval.jsonl"},
            {"name": "a1", "adapter": f"{base}/adapters/a1"},
            {"name": "missing", "adapter": f"{base}/adapters/not-there"},
            {"name": "a2", "adapter": f"{base}/adapters/a2"},
            {"name": "foreign", "adapter": f"{base}/adapters/foreign"},
        ],
    }
    files.write_text_atomic(f"{base}/fleet.yaml", yaml.safe_dump(manifest))
    result = run_migrate_fleet(f"{base}/fleet.yaml", cache_root=f"{base}/cache")
    return {"base": base, "result": result}


def published_report(uri: str) -> dict:
    return files.read_json(uris.join_uri(uri, "migration_report.json"))


def same_adapter_bytes(a, b) -> bool:
    a, b = Path(a), Path(b)
    return all((a / name).read_bytes() == (b / name).read_bytes()
               for name in ("adapter_model.safetensors", "adapter_config.json"))


def task_runs(flow_run_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
                                     limit=200)


def artifacts_of(flow_run_id: str) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return {a.key: a for a in found}


# --------------------------------------------------------------------------- fleet on S3


def test_fleet_analyses_the_pair_once_and_publishes_every_good_adapter(fleet_run, pair):
    result, base = fleet_run["result"], fleet_run["base"]
    assert result["published"] == ["a0", "a1", "a2"]
    failed = {f["name"]: f["error"] for f in result["failed"]}
    assert set(failed) == {"missing", "foreign"}
    assert "does not exist" in failed["missing"] and "not-there" in failed["missing"]
    assert "not trained on this model" in failed["foreign"]
    assert all(result["analysis"][stage]["cache"] == "computed" for stage in ANALYSIS)

    flow_run_id = published_report(f"{base}/out/a1")["pipeline"]["flow_run_id"]
    from prefect import get_client

    with get_client(sync_client=True) as client:   # two failed entries: the run is Failed (red), not Completed
        state = client.read_flow_run(UUID(flow_run_id)).state
    assert state.type.value == "FAILED" and "2 of 5 adapter(s) failed: missing, foreign" in state.message
    names = [run.name for run in task_runs(flow_run_id)]
    for stage in ("vocabulary", "transfer-matrix", "activations", "cka", "layer-mapping", "head-similarity"):
        assert sum(name.startswith(f"{stage}-") for name in names) == 1, stage
    assert sum(name.startswith("transfer-a1-layer-") for name in names) == 3   # one mapped task per new layer
    fs, _ = uris.resolve(base)
    for stage in ("activations", "cka", "head_similarity"):
        assert len(fs.ls(f"{base}/cache/{stage}")) == 1

    new_local = materialize.materialize_dir(f"{base}/models/new")
    for name in result["published"]:
        local = materialize.materialize_dir(f"{base}/out/{name}", require_complete=True)
        assert {"adapter_config.json", "adapter_model.safetensors", "migration_report.json"} <= {p.name for p in local.iterdir()}
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new_local), local)
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
    assert not [p for p in fs.find(f"{base}/out") if ".tmp-" in p]


def test_fleet_adapters_are_exact_and_carry_lft_and_evaluation(fleet_run, pair):
    base = fleet_run["base"]
    old_local, new_local = pair["old"], materialize.materialize_dir(f"{base}/models/new")
    migrated = materialize.materialize_dir(f"{base}/out/a1", require_complete=True)
    ids = [[3, 17, 42, 7, 99, 12], [5, 6, 7, 8]]
    reference, moved = logits_over_shared_vocab(old_local, new_local, ids, old_adapter=pair["adapters"]["a1"],
                                                new_adapter=migrated)
    assert relative_max_error(reference, moved) <= 1e-4

    report = published_report(f"{base}/out/a0")
    assert set(report["evaluation"]) == {"old model + source adapter", "new model, no adapter",
                                         "new model + migrated (transfer)", "new model + migrated + LFT"}
    assert report["light_finetune"]["n_samples"] == 4 and report["steps"]["lft"]["cache"] == "computed"
    config = files.read_json(f"{base}/out/a0/adapter_config.json")
    assert config["base_model_name_or_path"] == f"{base}/models/new"
    assert files.dir_is_empty(f"{base}/out/missing") and files.dir_is_empty(f"{base}/out/foreign")

    found = artifacts_of(report["pipeline"]["flow_run_id"])
    assert "data:image/png;base64," in found["lorasuite-cka-heatmap"].data
    assert "| new layer | old layer | CKA |" in found["lorasuite-layer-mapping"].data
    assert "non-identity head permutation" in found["lorasuite-head-mapping"].data
    assert "new model + migrated + LFT" in found["lorasuite-evaluation-a0"].data
    assert found["lorasuite-fleet-progress"].data == 100.0
    assert "not trained on this model" in found["lorasuite-fleet-summary"].data
    assert "| fidelity |" in found["lorasuite-fleet-summary"].data and "transfer 1.000" in found["lorasuite-fleet-summary"].data


def test_second_migration_of_the_pair_reuses_the_analysis(fleet_run, pair, tmp_path):
    from flows import run_migrate_adapter

    base, first = fleet_run["base"], fleet_run["result"]["analysis"]
    refs = (f"{base}/models/old", f"{base}/models/new", f"{base}/adapters/a3")
    out = run_migrate_adapter(*refs, f"{base}/single/a3", analysis=SMALL, cache_root=f"{base}/cache")
    steps = out["summary"]["steps"]
    report = published_report(f"{base}/single/a3")
    assert report["steps"] == steps
    assert out["summary"]["fidelity"] == report["fidelity"]["fidelity"]              # the CLI/flow summary shows it
    assert out["summary"]["fidelity"]["transfer"] == pytest.approx(1.0, abs=1e-3)   # a function-preserving upgrade
    assert all(steps[stage]["cache"] == "reused" for stage in ANALYSIS)
    assert steps["transfer"]["cache"] == "computed"
    assert steps["activations"]["seconds"] < first["activations"]["seconds"]
    assert sum(steps[s]["seconds"] for s in ANALYSIS) < sum(first[s]["seconds"] for s in ANALYSIS)

    # the same stage graph run in process over a fresh store: computed afresh, bit-identical
    migrate_in_process(*refs, tmp_path / "reference", analysis=SMALL, cache_root=str(tmp_path / "ref"))
    assert same_adapter_bytes(tmp_path / "reference", materialize.materialize_dir(f"{base}/single/a3", require_complete=True))


# --------------------------------------------------------------------------- failures


def failing_layer(monkeypatch, layer: int, failures: int | None):
    """Make the per-layer transfer of ``layer`` raise ``failures`` times (None: always); returns call counts."""
    from lorasuite_core.transfer.adapter import transfer_new_layer as real

    calls = {"all": 0, "failed": 0}

    def flaky(old, new, analysis, adapter, j, sources, mode, unit_maps=None):
        calls["all"] += 1
        if j == layer and (failures is None or calls["failed"] < failures):
            calls["failed"] += 1
            raise RuntimeError(f"worker lost while transferring layer {j}")
        return real(old, new, analysis, adapter, j, sources, mode, unit_maps)

    monkeypatch.setattr(stages, "transfer_new_layer", flaky)
    return calls


def test_failed_layer_is_retried_or_rerun_to_a_bit_identical_adapter(harness, pair, tmp_path, monkeypatch):
    from flows import run_migrate_adapter

    old, new, cache = str(pair["old"]), str(pair["new"]), str(pair["cache"])

    calls = failing_layer(monkeypatch, layer=2, failures=1)      # transient: Prefect retries the layer
    adapter = str(pair["adapters"]["a0"])
    run_migrate_adapter(old, new, adapter, str(tmp_path / "retried"), analysis=SMALL, cache_root=cache)
    assert calls == {"all": 4, "failed": 1}
    migrate_in_process(old, new, adapter, tmp_path / "reference-a0", analysis=SMALL,
                       cache_root=str(tmp_path / "ref"))
    assert same_adapter_bytes(tmp_path / "reference-a0", tmp_path / "retried")

    adapter = str(pair["adapters"]["a2"])
    failing_layer(monkeypatch, layer=2, failures=None)          # persistent: the run fails, nothing is published
    with pytest.raises(RuntimeError, match="worker lost while transferring layer 2"):
        run_migrate_adapter(old, new, adapter, str(tmp_path / "rerun"), analysis=SMALL, cache_root=cache)
    assert not (tmp_path / "rerun").exists()
    calls = failing_layer(monkeypatch, layer=2, failures=0)     # the rerun redoes only the missing layer
    out = run_migrate_adapter(old, new, adapter, str(tmp_path / "rerun"), analysis=SMALL,
                              cache_root=cache)
    assert calls["all"] == 1 and out["summary"]["steps"]["transfer"]["cache"] == "computed"
    migrate_in_process(old, new, adapter, tmp_path / "reference-a2", analysis=SMALL,
                       cache_root=str(tmp_path / "ref"))
    assert same_adapter_bytes(tmp_path / "reference-a2", tmp_path / "rerun")


def test_upload_failure_retries_then_fails_without_a_partial_adapter(harness, pair, s3_endpoint, monkeypatch):  # noqa: F811
    from flows import run_migrate_adapter

    output = s3_endpoint.unique_uri("unreachable") + "/adapter"
    real_stage = publish._stage_remote
    attempts = []

    def upload_then_lose_connection(fs, source, staging, uri, marker, policy):
        first = marker["files"][0]["path"]
        fs.put_file(str(source / first), f"{staging}/{first}")     # something lands under the temporary prefix

        def put_rest():
            attempts.append(1)
            raise ConnectionError("connection reset by peer (simulated)")
        retry.retry_call(put_rest, retry.RetryPolicy(attempts=3, base_delay=0.05), uri, "upload")

    monkeypatch.setattr(publish, "_stage_remote", upload_then_lose_connection)
    with pytest.raises(retry.StorageUnavailableError, match=r"storage unavailable: .* after 3 attempt\(s\)"):
        run_migrate_adapter(str(pair["old"]), str(pair["new"]), str(pair["adapters"]["a0"]), output,
                            analysis=SMALL, cache_root=str(pair["cache"]))
    monkeypatch.setattr(publish, "_stage_remote", real_stage)
    assert len(attempts) == 3
    fs, path = uris.resolve(output)
    parent = path.rsplit("/", 1)[0]
    fs.invalidate_cache()
    assert fs.find(parent) == []                                      # no adapter, no temporary prefix


def test_unreachable_endpoint_is_a_clear_user_error(harness, pair, monkeypatch):
    from flows import run_migrate_adapter

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(LorasuiteError, match=r"storage unavailable: s3://nowhere/adapter after \d+ attempt"):
        run_migrate_adapter(str(pair["old"]), str(pair["new"]), str(pair["adapters"]["a0"]), "s3://nowhere/adapter",
                            analysis=SMALL, cache_root=str(pair["cache"]))


def test_malformed_manifest_names_the_field_before_any_run(tmp_path):
    from flows import run_migrate_fleet

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"old_model": "/m/old", "new_model": "/m/new", "output_root": "/out",
                                    "adapters": [{"name": "a", "adapter": "/a"}, {"name": "b", "adaptor": "/b"}]}))
    with pytest.raises(ManifestError) as info:
        run_migrate_fleet(str(path))
    assert "adapters[1].adapter: Field required" in str(info.value)
    assert "adapters[1].adaptor: Extra inputs are not permitted" in str(info.value)


def test_release_migrates_the_fleet_of_the_predecessor_only(harness, pair, tmp_path):
    from flows import on_base_model_release

    manifest = tmp_path / "fleet.json"
    manifest.write_text(json.dumps({
        "old_model": str(pair["old"]), "new_model": "org/some-other-model", "output_root": str(tmp_path / "out"),
        "analysis": {"max_calibration_tokens": TOKENS}, "adapters": [{"name": "a0", "adapter": str(pair["adapters"]["a0"])}],
    }))
    ignored = on_base_model_release("org/unrelated", str(pair["new"]), str(manifest), cache_root=str(pair["cache"]))
    assert ignored["published"] == [] and "nothing to migrate" in ignored["note"]
    done = on_base_model_release(str(pair["old"]) + "/", str(pair["new"]), str(manifest),
                                 output_root=str(tmp_path / "released"), cache_root=str(pair["cache"]))
    assert done["published"] == ["a0"] and done["failed"] == []
    assert completion.is_complete(tmp_path / "released" / "a0")
    assert set(done["analysis"]) == set(ANALYSIS)
    again = on_base_model_release(str(pair["old"]), str(pair["new"]), str(manifest),
                                  output_root=str(tmp_path / "released"), cache_root=str(pair["cache"]))
    assert [s["name"] for s in again["skipped"]] == ["a0"] and again["published"] == [] and again["analysis"] == {}


def test_bad_options_are_user_errors_before_any_run(tmp_path, capsys):
    from flows.cli import main

    base = ["migrate", "--old-model", "old", "--new-model", "new", "--adapter", "adapter",
            "--output", str(tmp_path / "out")]
    for flags, message in ((["--head-transform", "procrustes"], "invalid choice: 'procrustes'"),
                           (["--lft-samples", "0"], "--lft-samples: Input should be greater than or equal to 1"),
                           (["--lft"], "light fine-tuning needs LFT data"),
                           (["--max-calibration-tokens", "4"], "--max-calibration-tokens: Input should be greater")):
        with pytest.raises(SystemExit) if "choice" in message else contextlib.nullcontext():
            assert main(base + flags) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(LorasuiteError, match="lft_samples: Input should be greater than or equal to 1"):
        validate(MigrationOptions, {"lft_samples": 0})
