"""Tests for lorasuite_core.pipeline.manifest: loading, validation errors with field paths, option merging."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from lorasuite_core.io import files
from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import (
    BaseModelRelease,
    FleetManifest,
    ManifestError,
    MigrationOptions,
)

from tests.s3_server import s3_endpoint  # noqa: F401 - pytest fixture

VALID_YAML = """\
old_model: s3://bucket/models/old
new_model: s3://bucket/models/new
output_root: s3://bucket/migrated/
defaults: {lft: true, lft_samples: 100, lft_lr: 9e-4, lft_epochs: 1, head_transform: lstsq}
adapters:
  - name: support-bot
    adapter: s3://bucket/adapters/support-bot
    lft_data: s3://bucket/data/support.jsonl
    eval_data: s3://bucket/data/support-test.jsonl
    overrides: {lft_samples: 200}
  - name: sql_gen.v2
    adapter: /local/adapters/sql
"""

VALID = {
    "old_model": "Qwen/Qwen2.5-0.5B",
    "new_model": "Qwen/Qwen2.5-1.5B",
    "output_root": "/tmp/out",
    "adapters": [
        {"name": "a", "adapter": "/adapters/a", "lft_data": "/data/a.jsonl"},
        {"name": "b", "adapter": "/adapters/b"},
        {"name": "c", "adapter": "/adapters/c"},
    ],
}


def load_dict(data: dict) -> FleetManifest:
    return FleetManifest.from_dict(data, source="fleet.json")


def test_valid_yaml_manifest_loads_and_merges_options(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(VALID_YAML)
    manifest = FleetManifest.load(str(path))
    assert [entry.name for entry in manifest.adapters] == ["support-bot", "sql_gen.v2"]
    assert manifest.defaults.lft_lr == pytest.approx(9e-4)  # YAML 1.1 reads 9e-4 as a string
    bot, sql = manifest.adapters
    options = bot.effective_options(manifest.defaults)
    assert options == MigrationOptions(lft=True, lft_samples=200, lft_lr=9e-4, lft_epochs=1, head_transform="lstsq",
                                       lft_data="s3://bucket/data/support.jsonl",
                                       eval_data="s3://bucket/data/support-test.jsonl")
    assert manifest.effective_options(sql).lft is False  # no lft_data => transfer only
    assert manifest.effective_options(sql).lft_samples == 100
    assert manifest.output_uri(bot) == "s3://bucket/migrated/support-bot"
    assert manifest.entry("sql_gen.v2") is sql


def test_valid_json_manifest_loads_with_defaults(tmp_path):
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(VALID))
    manifest = FleetManifest.load(path)
    assert manifest.defaults == MigrationOptions()
    assert manifest.effective_options(manifest.adapters[0]).runs_lft is True      # lft unset: the data decides
    assert manifest.effective_options(manifest.adapters[1]).runs_lft is False
    assert manifest.output_uri("b") == "/tmp/out/b"


def test_a_fleet_distils_on_the_defaults_prompts_and_names_the_entry_of_a_contradiction():
    base = {"old_model": "/m/old", "new_model": "/m/new", "output_root": "/tmp/out",
            "adapters": [{"name": "a", "adapter": "/a"}, {"name": "b", "adapter": "/b", "lft_data": "builtin:train"}]}
    for defaults in ({"route": "distill", "lft_prompts": "task:arithmetic:train:40"},
                     {"lft_mode": "distill", "lft_prompts": "task:arithmetic:train:40"},
                     {"route": "auto", "lft_mode": "distill", "lft_seed_prompts": "/seeds.txt"}):
        fleet = FleetManifest.model_validate({**base, "defaults": defaults})
        a, b = (fleet.effective_options(e) for e in fleet.adapters)
        assert a.runs_lft and a.lft_mode == "distill" and a.lft_data is None       # the defaults' prompts suffice
        assert b.runs_lft and b.lft_data == "builtin:train"
    labelled = FleetManifest.model_validate({**base, "defaults": {"lft": True}})
    assert labelled.effective_options(labelled.adapters[0]).runs_lft is False       # no data: transfer only
    distil = FleetManifest.model_validate({**base, "defaults": {"route": "distill"}})
    assert distil.effective_options(distil.adapters[0]).route == "distill"          # no prompts: the route's check says so
    contradiction = FleetManifest.model_validate(
        {**base, "defaults": {"route": "distill", "lft_prompts": "p.txt"},
         "adapters": [{"name": "a", "adapter": "/a", "overrides": {"lft_mode": "labelled"}}]})
    with pytest.raises(LorasuiteError, match=r"^adapter a: invalid migration options: route distill distils from "
                                             r"the teacher; lft_mode labelled contradicts it$"):
        contradiction.effective_options(contradiction.adapters[0])


def test_manifest_loads_from_s3(s3_endpoint):
    uri = s3_endpoint.unique_uri("manifest") + "/fleet.yaml"
    files.write_text_atomic(uri, VALID_YAML)
    manifest = FleetManifest.load(uri)
    assert manifest.new_model == "s3://bucket/models/new"
    assert len(manifest.adapters) == 2


def mutated(path: tuple, value=None, delete: bool = False) -> dict:
    data = copy.deepcopy(VALID)
    target = data
    for part in path[:-1]:
        target = target[part]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "expected_path"),
    [
        (mutated(("adapters", 2, "adapter"), delete=True), "adapters[2].adapter: Field required"),
        (mutated(("adapters", 1, "name"), "bad name!"), "adapters[1].name: String should match pattern"),
        (mutated(("adapters", 0, "name"), ".."), "adapters[0].name: Value error, must not consist only of dots"),
        (mutated(("adapters", 2, "name"), "a"), "adapters[2].name: duplicate adapter name 'a'"),
        (mutated(("adapters", 1, "lft_sample"), 5), "adapters[1].lft_sample: Extra inputs are not permitted"),
        (mutated(("colour",), "blue"), "colour: Extra inputs are not permitted"),
        (mutated(("defaults",), {"lft_samples": "many"}), "defaults.lft_samples: Input should be a valid integer"),
        (mutated(("adapters", 0, "overrides"), {"lft_lr": -1}), "adapters[0].overrides.lft_lr: Input should be greater than 0"),
        (mutated(("adapters", 0, "overrides"), {"head_transform": "procrustes"}), "adapters[0].overrides.head_transform: Input should be"),
        (mutated(("adapters", 1, "name"), 7), "adapters[1].name: Input should be a valid string"),
        (mutated(("adapters",), "not-a-list"), "adapters: Input should be a valid list"),
        (mutated(("adapters",), []), "adapters: List should have at least 1 item"),
        (mutated(("new_model",), "Qwen/Qwen2.5-0.5B"), "new_model: must differ from old_model"),
        (mutated(("output_root",), delete=True), "output_root: Field required"),
        (mutated(("old_model",), "  "), "old_model: Value error, must be a non-empty"),
    ],
)
def test_invalid_manifest_names_the_field_path(data, expected_path):
    with pytest.raises(ManifestError) as info:
        load_dict(data)
    message = str(info.value)
    assert message.startswith("invalid fleet manifest fleet.json: ")
    assert expected_path in message
    assert "\n" not in message
    assert any(expected_path.startswith(path) for path, _ in info.value.errors)


def test_several_errors_are_all_reported():
    data = mutated(("adapters", 0, "name"), "x y")
    data["adapters"][2]["extra"] = 1
    with pytest.raises(ManifestError) as info:
        load_dict(data)
    assert [path for path, _ in info.value.errors] == ["adapters[0].name", "adapters[2].extra"]
    assert pickle.loads(pickle.dumps(info.value)).errors == info.value.errors
    assert isinstance(info.value, LorasuiteError) and isinstance(info.value, ValueError)


def test_unparseable_and_missing_files_give_manifest_errors(tmp_path):
    bad_yaml = tmp_path / "fleet.yaml"
    bad_yaml.write_text("old_model: [unclosed\n")
    with pytest.raises(ManifestError, match=r"fleet.yaml: invalid YAML at line \d+"):
        FleetManifest.load(str(bad_yaml))
    bad_json = tmp_path / "fleet.json"
    bad_json.write_text("{")
    with pytest.raises(ManifestError, match="invalid JSON at line 1"):
        FleetManifest.load(str(bad_json))
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match="<root>: expected a mapping"):
        FleetManifest.load(str(not_mapping))
    with pytest.raises(ManifestError, match="manifest file not found"):
        FleetManifest.load(str(tmp_path / "absent.yaml"))


def test_base_model_release_schema():
    event = BaseModelRelease.model_validate(
        {"previous_model": "org/old", "new_model": "org/new", "fleet_manifest": "s3://b/fleet.yaml"}
    )
    assert event.fleet_manifest == "s3://b/fleet.yaml"
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        BaseModelRelease.model_validate({"previous_model": "a", "new_model": "b", "fleet_manifest": "c", "x": 1})
