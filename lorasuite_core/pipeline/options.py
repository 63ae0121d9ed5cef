"""The one options schema: every knob of a migration, declared once, with its default and its help.

Design
------
Two pydantic models hold every option a migration takes; everything else is derived from them:

* :class:`MigrationOptions` — per adapter: head transform, light fine-tuning, evaluation,
  the vanilla baseline, the seed.
* :class:`AnalysisOptions` — per model pair (shared by every adapter of a fleet): calibration
  text and its token budget, the layer offset.

Derived, never restated:

* CLI flags (:func:`add_arguments` / :func:`from_arguments`): ``--field-name`` per field, the
  type and the choices from the annotation, the help from the field's description plus its
  default; a boolean is ``--x/--no-x``.  An unset flag is the schema's default.
* ``lorasuite train`` / ``lorasuite eval`` flags: from the training and evaluation configs
  (:mod:`lorasuite_core.training.config`, plain dataclasses: :func:`add_config_arguments` /
  :func:`config_from_arguments`), with the same rules.
* Flow parameters: the flows take ``options: MigrationOptions`` and ``analysis:
  AnalysisOptions``, which Prefect shows as a form in the UI and validates.
* Fleet manifests: ``defaults`` is a :class:`MigrationOptions`, ``analysis`` an
  :class:`AnalysisOptions`, an entry's ``overrides`` the same fields all optional
  (:data:`OptionOverrides`, generated from :class:`MigrationOptions`).
* Stage keys and plans (:mod:`lorasuite_core.pipeline.stages`) read these models directly.

Light fine-tuning runs when ``lft`` is not false and there is LFT data: ``lft`` left unset
(None) means "when LFT data is given", ``lft: false`` transfers only, and ``lft: true`` with no
data is an error for a single adapter (:meth:`MigrationOptions.check_single`); in a fleet an
entry without LFT data is transferred only.  Every validation error becomes one line,
:func:`validate`, naming the flag (CLI) or the field path (manifest, flow).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.training.skills import check_data_ref

# The choices of lorasuite_core.transfer (unit_maps.MODES, layer_mapping.LAYER_MAPPINGS,
# matching.HEAD_MAPPINGS; not imported here: they pull in torch; tests/test_options.py checks they agree).
HeadTransform = Literal["lstsq", "paper"]
LayerMapping = Literal["cka", "sequential", "first", "last"]
HeadMapping = Literal["hungarian", "identity"]
TransferFit = Literal["weights", "activations"]
LftMode = Literal["labelled", "distill"]
ServingEngine = Literal["vllm", "vllm-lora"]
Route = Literal["transfer", "distill", "fresh-distill", "copy", "auto"]
GenerationDtype = Literal["auto", "float32", "bfloat16"]
#: The routes that distil (their LFT is distilled from the teacher, ``lft_mode`` distill).
DISTILL_ROUTES = ("distill", "fresh-distill")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, validate_assignment=True)


class MigrationOptions(_Options):
    """Per-adapter options: a fleet entry's effective options, the single-adapter flow's ``options``."""

    route: Route = Field(
        "transfer", description="transfer: the LoRASuite transfer (+ LFT when LFT data is given); distill: transfer + "
                                "distilled LFT (implies --lft-mode distill); fresh-distill: a fresh LoRA (B = 0) on the "
                                "new model distilled the same way; copy: the adapter as is (same shapes and vocabulary "
                                "only); auto: every candidate route, cheapest first, scored on held-out teacher "
                                "agreement and fidelity; the best that clears the quality gate is published")
    head_transform: HeadTransform = Field(
        "lstsq", description="head alignment: lstsq (exact least squares) or paper (LoRASuite Eq. 3)")
    lft: bool | None = Field(
        None, description="light fine-tuning (LFT) of the migrated adapter; unset: when LFT data is given, "
                          "--no-lft: transfer only")
    lft_mode: LftMode = Field(
        "labelled", description="labelled: train on the LFT data's answers; distill: train on the teacher's (old "
                                "model + old adapter) greedy answers to unlabelled prompts")
    lft_data: str | None = Field(
        None, description="LFT data: math_10k JSON/JSONL (local or fsspec URI), builtin:train or "
                          "task:NAME:SPLIT[:COUNT] (distill: its prompts, answers ignored)")
    lft_prompts: str | None = Field(
        None, description="distill: unlabelled prompts, .txt (one per line) or JSONL ('prompt', or math_10k "
                          "'instruction'/'input'), or task:NAME:SPLIT[:COUNT]")
    lft_seed_prompts: str | None = Field(
        None, description="distill: a few seed prompts (same formats); the old model (the teacher without its "
                          "adapter) writes --lft-samples new one-line questions in their style")
    lft_kl_weight: float = Field(1.0, ge=0, description="distill: weight of the token-level KL over the shared "
                                                        "vocabulary (0: completions only)")
    lft_samples: int = Field(100, ge=1, description="LFT samples")
    lft_lr: float = Field(9e-4, gt=0, description="LFT learning rate (no warmup)")
    lft_epochs: int = Field(1, ge=1, description="LFT epochs")
    lft_patience: int | None = Field(
        None, ge=1, description="distill: early stopping -- after every epoch score the held-out teacher agreement "
                                "(ties: the held-out distillation loss), publish the best epoch's adapter, stop after "
                                "N epochs without improvement; unset: every epoch runs, the last is published")
    lft_dedup: bool = Field(
        False, description="distill: drop prompts that repeat an earlier one or a held-out evaluation prompt "
                           "(compared lower-cased, whitespace collapsed) before the held-out split; dropped prompts are "
                           "not replaced")
    lft_consistency: int | None = Field(
        None, ge=2, description="distill: self-consistency filter -- the teacher also samples N answers per training "
                                "prompt (temperature 0.7); a prompt trains only where at least half of them agree "
                                "with its greedy answer; dropped prompts are not replaced")
    lft_on_policy: float = Field(
        0.0, ge=0, le=1, description="distill: on-policy distillation (GKD) -- this share of the training batches "
                                     "trains on answers the student samples itself (temperature 1), the teacher's "
                                     "token distributions on them as the target (the token-level KL alone, over the "
                                     "shared vocabulary); 0: off")
    eval_data: str | None = Field(
        None, description="evaluate every row (old adapter, bare new model, migrated, LFT) on this data: "
                          "math_10k JSON/JSONL, builtin:test or task:NAME:SPLIT[:COUNT]")
    eval_samples: int | None = Field(None, ge=1, description="evaluate on the first N samples")
    vanilla_baseline: bool = Field(
        False, description="also train a fresh LoRA on the LFT samples and evaluate it (needs LFT and eval data)")
    zero_init_unmapped: bool | None = Field(
        None, description="LoRA modules with B = 0 on new layers no old layer maps to, so LFT can train them (the "
                          "start stays exact); unset: when LFT runs")
    seed: int = Field(0, description="seed of LFT, the vanilla baseline, prompt synthesis and the built-in data")
    gate: bool = Field(
        False, description="quality gate: publish only when the adapter agrees with the teacher on held-out prompts "
                           "better than the bare new model by --gate-margin (and is not less accurate with --eval-data)")
    gate_margin: float = Field(0.05, ge=-1, le=1, description="quality gate: required agreement over the bare model")
    gate_prompts: int = Field(32, ge=1, description="quality gate / distill / fidelity: held-out prompts (the first N "
                                                    "of --eval-data, else split off the LFT prompts)")
    fidelity: bool = Field(
        True, description="measure fidelity: the share of the gap between the bare new model and the teacher (old "
                          "model + old adapter) that the migrated adapter closes, in nats per character of the "
                          "teacher's answers to held-out prompts (distillation's, else --eval-data's, else the "
                          "calibration texts)")
    generation_dtype: GenerationDtype = Field(
        "float32", description="dtype of the greedy generation that distillation, fidelity, the quality gate and "
                               "--route auto read (the teacher's answers and self-consistency samples, the new model's "
                               "held-out answers): float32; bfloat16 (the models in bf16: faster where the hardware "
                               "has bf16 units, but the teacher's answers differ on ~5 % of prompts and a distilled "
                               "adapter scored lower in a measurement, benchmarks/GENERATION_DTYPE.md); auto (bfloat16 "
                               "on CPUs with AVX512-BF16/AMX and on bf16 GPUs, else float32).  Training, early stopping "
                               "and fidelity's scoring keep their own dtypes")
    serving: ServingEngine | None = Field(
        None, description="vllm: publish the plain-LoRA form vLLM, LoRAX and TGI serve exactly (one rank, an allowed "
                          "max_lora_rank, zero-padded; AdaLoRA's E folded into A; non-LoRA weights left out; DoRA "
                          "refused); vllm-lora: the same, a DoRA adapter approximated by plain LoRA with its residual "
                          "reported; unset: PEFT's form (the report's serving section says what each engine accepts)")

    @model_validator(mode="before")
    @classmethod
    def _distill_routes_distil(cls, values: Any) -> Any:
        """``route: distill`` / ``fresh-distill`` distil: ``lft_mode`` defaults to distill there, labelled is refused."""
        if isinstance(values, dict) and values.get("route") in DISTILL_ROUTES:
            if values.get("lft_mode") == "labelled":
                raise ValueError(f"route {values['route']} distils from the teacher; lft_mode labelled contradicts it")
            if values.get("lft") is False:
                raise ValueError(f"route {values['route']} distils from the teacher; lft false (--no-lft) "
                                 "contradicts it")
            values = {**values, "lft_mode": "distill"}
        return values

    @model_validator(mode="after")
    def _patience_distils(self) -> "MigrationOptions":
        """Early stopping and the consistency filter read the teacher: distilled LFT only."""
        if self.lft_patience is not None and self.lft_mode != "distill":
            raise ValueError("lft_patience (early stopping on held-out teacher agreement) needs lft_mode distill")
        if self.lft_consistency is not None and self.lft_mode != "distill":
            raise ValueError("lft_consistency (the teacher's self-consistency filter) needs lft_mode distill")
        if self.lft_on_policy > 0 and self.lft_mode != "distill":
            raise ValueError("lft_on_policy (on-policy distillation) needs lft_mode distill")
        if self.lft_on_policy > 0 and self.lft_kl_weight == 0:
            raise ValueError("lft_on_policy trains on the token-level KL alone; lft_kl_weight 0 turns it off")
        return self

    @field_validator("lft_data", "lft_prompts", "lft_seed_prompts", "eval_data")
    @classmethod
    def _task_spec_parses(cls, value: str | None) -> str | None:
        return check_data_ref(value)

    def check_single(self) -> "MigrationOptions":
        """For one adapter (CLI, flow, in process): ``lft`` true needs LFT data.

        Not a validator: a fleet's ``defaults`` may say ``lft: true`` while the data comes per entry
        (an entry without LFT data is transferred only, see the manifest)."""
        if (self.lft or self.route in DISTILL_ROUTES) and not self.has_lft_data:
            if self.lft_mode == "distill":
                raise LorasuiteError(f"{'route ' + self.route if self.route in DISTILL_ROUTES else 'distilled light fine-tuning'} needs prompts (--lft-prompts, --lft-seed-prompts or "
                                     "--lft-data); --no-lft / lft: false transfers only")
            raise LorasuiteError("light fine-tuning needs LFT data (--lft-data / lft_data: 100-400 samples of the "
                                 "adapter's task, or builtin:train for the built-in arithmetic problems; or "
                                 "--lft-mode distill with unlabelled prompts); --no-lft / lft: false transfers only")
        if (self.gate or self.route == "auto") and not self.has_heldout:
            what = "--route auto (scored on the quality gate's measure)" if self.route == "auto" else "the quality gate"
            raise LorasuiteError(f"{what} needs held-out prompts: --eval-data, or distilled LFT "
                                 "(--lft-mode distill) whose prompts it splits")
        return self

    @property
    def has_heldout(self) -> bool:
        """Held-out prompts for the gate (and ``route: auto``): the evaluation data's, or split off distillation's."""
        return bool(self.eval_data) or (self.runs_lft and self.lft_mode == "distill")

    @property
    def has_lft_data(self) -> bool:
        if self.lft_mode == "distill":
            return bool(self.lft_prompts or self.lft_seed_prompts or self.lft_data)
        return bool(self.lft_data)

    @property
    def synthesises_prompts(self) -> bool:
        """Distillation's prompts are written from the seed prompts (given, and no ``lft_prompts``)."""
        return self.lft_mode == "distill" and bool(self.lft_seed_prompts) and not self.lft_prompts

    @property
    def runs_lft(self) -> bool:
        """LFT happens: asked for (or left to the data) and there is LFT data."""
        return self.lft is not False and self.has_lft_data

    @property
    def adds_zero_init(self) -> bool:
        return self.runs_lft if self.zero_init_unmapped is None else self.zero_init_unmapped

    @property
    def runs_vanilla(self) -> bool:
        """A fresh LoRA needs labelled samples: the LFT data."""
        return self.vanilla_baseline and self.runs_lft and bool(self.lft_data)


class AnalysisOptions(_Options):
    """Per-pair options: the analysis every adapter of the pair shares (the fleet's ``analysis``)."""

    calibration_data: str | None = Field(
        None, min_length=1, description="calibration text: .txt (one sample per line) or .jsonl with a 'text' "
                                        "field, local or URI, or task:NAME:SPLIT[:COUNT] (the task's prompts in the "
                                        "built-in template); unset: the built-in text")
    max_calibration_tokens: int = Field(2048, ge=8, description="paired calibration tokens for the activations")
    layer_offset: int | None = Field(
        None, ge=0, description="max |new layer - old layer| drift of the layer mapping; unset: the layer-count "
                                "difference")
    layer_mapping: LayerMapping = Field(
        "cka", description="cka: monotone DP on the CKA of layer updates; sequential: old layers spread evenly "
                           "over the new ones; first / last: aligned at the input / output end (ablations)")
    head_mapping: HeadMapping = Field(
        "hungarian", description="hungarian: heads matched on their QK/VO similarity; identity: head h to head h "
                                 "(ablation)")
    transfer_fit: TransferFit = Field(
        "weights", description="residual-side maps of the transfer: weights (least squares on the shared token "
                               "embeddings, one for all layers) or activations (ridge per mapped layer pair on the "
                               "paired calibration states; give the adapter's own prompts as --calibration-data)")

    @field_validator("calibration_data")
    @classmethod
    def _calibration_spec_parses(cls, value: str | None) -> str | None:
        return check_data_ref(value)


def _overrides_model() -> type[BaseModel]:
    fields = {name: (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
              for name, info in MigrationOptions.model_fields.items()}
    return create_model("OptionOverrides", __base__=_Options, **fields)


#: A fleet entry's ``overrides``: the fields of :class:`MigrationOptions`, all optional.
OptionOverrides = _overrides_model()


def merged(defaults: MigrationOptions, *updates: dict[str, Any]) -> MigrationOptions:
    """``defaults`` with each mapping's values applied in turn (None values ignored), validated."""
    values = defaults.model_dump(exclude_unset=True)
    for update in updates:
        values.update({k: v for k, v in update.items() if v is not None})
    return validate(MigrationOptions, values, "")


def validate(model: type[BaseModel], values: dict[str, Any], where: str = "",
             name: typing.Callable[[str], str] = str) -> Any:
    """``model(**values)``, or one-line LorasuiteError listing ``field: problem`` for each error.

    ``name`` renders a field name (the CLI passes ``--flag-name``); ``where`` prefixes the line.
    """
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = []
        for e in error.errors(include_url=False):
            field = ".".join(name(str(part)) for part in e["loc"])
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {message}" if field else message)
        raise LorasuiteError(f"{where}invalid migration options: {'; '.join(problems)}") from None


# --------------------------------------------------------------------------- the CLI, derived


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain(annotation: Any) -> Any:
    """``int | None`` -> int; Literal stays."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of ``model``; unset flags stay None (the schema's default applies)."""
    for name, info in model.model_fields.items():
        kind = _plain(info.annotation)
        default = info.get_default()
        shown = "" if default is None else f" (default {default})"
        help_text = (info.description or "") + shown
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
        elif kind in (int, float):
            kwargs["type"] = kind
            kwargs["metavar"] = "N" if kind is int else "X"
        parser.add_argument(flag(name), **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, config: type, names: typing.Sequence[str]) -> None:
    """One flag per named field of the dataclass ``config`` (``lorasuite_core.training.config``): the type and
    the default from the field, the help from its ``metadata["help"]``; unset flags stay None (the field's
    default applies, :func:`config_from_arguments`)."""
    hints = typing.get_type_hints(config)
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name in names:
        kind, default = _plain(hints[name]), fields[name].default
        shown = "" if default is None else f" (default {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": fields[name].metadata.get("help", "") + shown}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kwargs["type"], kwargs["metavar"] = kind, "N" if kind is int else "X"
        parser.add_argument(flag(name), **kwargs)


def config_from_arguments(args: argparse.Namespace, config: type, names: typing.Sequence[str], **fixed: Any) -> Any:
    """``config`` from the flags given (unset ones: the field's default) and ``fixed``; a value the config
    refuses is one LorasuiteError line naming the flag."""
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    try:
        return config(**values, **fixed)
    except ValueError as error:
        message = str(error)
        for name in sorted(names, key=len, reverse=True):      # lr_schedule before lr
            message = message.replace(f"{config.__name__}.{name}", flag(name))
        raise LorasuiteError(f"invalid option: {message}") from None


def from_arguments(args: argparse.Namespace, model: type[BaseModel]) -> Any:
    """The model from the flags given (unset ones take the schema's default); errors name the flag."""
    values = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    return validate(model, values, name=flag)
