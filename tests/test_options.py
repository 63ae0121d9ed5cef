"""The one options schema: CLI flags, flow parameters, manifest sections and stages all derive from it."""
from __future__ import annotations

import pytest

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.manifest import FleetManifest
from lorasuite_core.pipeline.options import (AnalysisOptions, MigrationOptions, OptionOverrides, flag,
                                             from_arguments, validate)

MODELS = (MigrationOptions, AnalysisOptions)


def _migrate_parser():
    from flows.cli import build_parser

    return build_parser()


def _args(*flags: str):
    return _migrate_parser().parse_args(["migrate", "--old-model", "o", "--new-model", "n", "--adapter", "a",
                                         "--output", "out", *flags])


def test_every_option_is_a_cli_flag_with_the_schemas_default():
    parser = _migrate_parser()
    migrate = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "migrate")[1]
    flags = {option for action in migrate._actions for option in action.option_strings}
    for model in MODELS:
        for name, info in model.model_fields.items():
            assert flag(name) in flags, f"{model.__name__}.{name} has no CLI flag"
            default = info.get_default()
            if default is not None and not isinstance(default, bool):
                help_text = next(a.help for a in migrate._actions if flag(name) in a.option_strings)
                assert f"(default {default})" in help_text
    args = _args()
    assert from_arguments(args, MigrationOptions) == MigrationOptions()
    assert from_arguments(args, AnalysisOptions) == AnalysisOptions()


def test_cli_flags_become_the_schema_values():
    args = _args("--no-lft", "--lft-lr", "0.002", "--head-transform", "paper", "--eval-samples", "7",
                 "--vanilla-baseline", "--layer-offset", "2", "--max-calibration-tokens", "512")
    options, analysis = from_arguments(args, MigrationOptions), from_arguments(args, AnalysisOptions)
    assert options == MigrationOptions(lft=False, lft_lr=0.002, head_transform="paper", eval_samples=7,
                                       vanilla_baseline=True)
    assert analysis == AnalysisOptions(layer_offset=2, max_calibration_tokens=512)
    with pytest.raises(LorasuiteError, match=r"^invalid migration options: --eval-samples: Input should be greater"):
        from_arguments(_args("--eval-samples", "0"), MigrationOptions)


def test_lft_runs_when_there_is_data_unless_switched_off():
    assert not MigrationOptions().runs_lft
    assert MigrationOptions(lft_data="builtin:train").runs_lft
    assert not MigrationOptions(lft=False, lft_data="builtin:train").runs_lft
    assert not MigrationOptions(lft_data="builtin:train", vanilla_baseline=False).runs_vanilla
    assert MigrationOptions(lft_data="builtin:train", vanilla_baseline=True).runs_vanilla
    assert not MigrationOptions(vanilla_baseline=True).runs_vanilla          # no LFT data: nothing to train on
    with pytest.raises(LorasuiteError, match="light fine-tuning needs LFT data"):
        MigrationOptions(lft=True).check_single()


def test_overrides_are_the_same_fields_all_optional_with_the_same_checks():
    assert set(OptionOverrides.model_fields) == set(MigrationOptions.model_fields)
    assert all(info.get_default() is None for info in OptionOverrides.model_fields.values())
    assert OptionOverrides(lft_samples=5).lft_samples == 5
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        OptionOverrides(lft_samples=0)
    with pytest.raises(ValueError, match="Input should be 'lstsq' or 'paper'"):
        OptionOverrides(head_transform="procrustes")


def test_manifest_precedence_defaults_then_overrides_then_entry_data():
    fleet = FleetManifest.from_dict({
        "old_model": "o", "new_model": "n", "output_root": "/out",
        "defaults": {"lft": True, "lft_samples": 50, "lft_data": "builtin:train", "seed": 3},
        "analysis": {"max_calibration_tokens": 300},
        "adapters": [{"name": "a", "adapter": "/a", "overrides": {"lft_samples": 7}},
                     {"name": "b", "adapter": "/b", "lft_data": "/data/b.jsonl", "eval_data": "/data/t.jsonl"},
                     {"name": "c", "adapter": "/c", "overrides": {"lft_data": None, "lft": False}}]})
    a, b, c = (fleet.effective_options(e) for e in fleet.adapters)
    assert (a.lft_samples, a.lft_data, a.seed, a.runs_lft) == (7, "builtin:train", 3, True)
    assert (b.lft_samples, b.lft_data, b.eval_data) == (50, "/data/b.jsonl", "/data/t.jsonl")
    assert not c.runs_lft
    assert fleet.analysis == AnalysisOptions(max_calibration_tokens=300)


def test_flow_parameters_are_the_schema_as_a_form():
    from prefect.utilities.callables import parameter_schema

    from flows.migration import migrate_adapter

    schema = parameter_schema(migrate_adapter.fn).model_dump_for_openapi()
    assert {"old_model", "new_model", "adapter", "output", "options", "analysis"} <= set(schema["properties"])
    definitions = schema["definitions"]
    for model in MODELS:
        fields = definitions[model.__name__]["properties"]
        assert set(fields) == set(model.model_fields)
        for name, info in model.model_fields.items():
            assert fields[name].get("default") == info.get_default()
            assert fields[name].get("description") == info.description


def test_validation_errors_are_one_line_naming_every_field():
    with pytest.raises(LorasuiteError) as info:
        validate(MigrationOptions, {"lft_samples": 0, "lft_lr": -1, "lft_sample": 3})
    text = str(info.value)
    assert "\n" not in text
    assert "lft_samples: Input should be greater than or equal to 1" in text
    assert "lft_lr: Input should be greater than 0" in text
    assert "lft_sample: Extra inputs are not permitted" in text


def test_transfer_choices_are_the_schemas_literals_and_flags():
    """options.py restates the transfer's choices as Literals (importing them would pull in torch): they must be
    the same tuples, in order, and the CLI offers exactly them."""
    from typing import get_args

    from lorasuite_core.pipeline.options import HeadMapping, HeadTransform, LayerMapping
    from lorasuite_core.transfer.layer_mapping import LAYER_MAPPINGS
    from lorasuite_core.transfer.matching import HEAD_MAPPINGS
    from lorasuite_core.transfer.unit_maps import MODES

    pairs = {"head_transform": (HeadTransform, MODES), "layer_mapping": (LayerMapping, LAYER_MAPPINGS),
             "head_mapping": (HeadMapping, HEAD_MAPPINGS)}
    parser = _migrate_parser()
    migrate = parser._subparsers._group_actions[0].choices["migrate"]
    for name, (literal, numerics) in pairs.items():
        assert get_args(literal) == numerics, f"{name}: options.py {get_args(literal)} != transfer {numerics}"
        model = MigrationOptions if name in MigrationOptions.model_fields else AnalysisOptions
        assert model.model_fields[name].annotation is literal
        action = next(a for a in migrate._actions if flag(name) in a.option_strings)
        assert tuple(action.choices) == numerics


def test_train_and_eval_flags_come_from_their_configs():
    """Every flag of ``train``/``eval`` beyond the references is a field of lorasuite_core.training.config: its help
    names the field's default, an unset flag is that default, a value the config refuses is one error line."""
    import argparse
    import dataclasses

    from flows.cli import EVAL_FLAGS, LORA_FLAGS, TRAIN_FLAGS, build_parser
    from lorasuite_core.errors import LorasuiteError
    from lorasuite_core.pipeline.options import config_from_arguments
    from lorasuite_core.training.config import EvalConfig, LoraShape, TrainConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, configs in (("train", ((TrainConfig, TRAIN_FLAGS), (LoraShape, LORA_FLAGS))),
                             ("eval", ((EvalConfig, EVAL_FLAGS),))):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        for config, names in configs:
            defaults = {f.name: f.default for f in dataclasses.fields(config)}
            for name in names:
                said = "(default" if defaults[name] is None else f"(default {defaults[name]})"   # None: the help says
                assert said in actions[name].help and actions[name].default is None, name
    args = parser.parse_args(["train", "--model", "m", "--output", "o", "--epochs", "3"])
    config = config_from_arguments(args, TrainConfig, TRAIN_FLAGS, show_progress=False)
    assert config == TrainConfig(epochs=3, show_progress=False)      # everything else is TrainConfig's default
    assert config_from_arguments(args, LoraShape, LORA_FLAGS) == LoraShape()
    bad = parser.parse_args(["train", "--model", "m", "--output", "o", "--lr-schedule", "cosine"])
    with pytest.raises(LorasuiteError, match="--lr-schedule must be 'linear' or 'constant'"):
        config_from_arguments(bad, TrainConfig, TRAIN_FLAGS)
