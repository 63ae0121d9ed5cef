"""``lorasuite`` command line.

Every failure the user can cause (bad input, unsupported model, an unsafe or occupied output,
unreadable or unwritable paths, a full disk, refused credentials…) ends with one line
``lorasuite: error: …`` on stderr and exit status 2, nothing written: a ``LorasuiteError`` or an
``OSError`` (permissions, no space, a file where a directory belongs).  Anything else is a bug:
one line naming the log file that holds the traceback, exit status 1.  Logs go to a log file
and only lorasuite's own lines reach the terminal (:mod:`lorasuite_core.io.logsetup`); credentials
seen in URIs are redacted everywhere.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io.logsetup import FILE_ONLY

log = logging.getLogger("lorasuite")


def _add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions, add_arguments

    p.add_argument("--old-model", required=True, help="old base model: local dir, fsspec URI (s3://…) or hub id")
    p.add_argument("--new-model", required=True, help="new base model: local dir, fsspec URI or hub id")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter trained on the old model")
    p.add_argument("--output", required=True, help="directory for the migrated PEFT adapter and migration_report.json")
    p.add_argument("--overwrite", action="store_true", help="replace our earlier publication at --output")
    p.add_argument("--cache-root", help="pair-analysis cache and result storage: local dir or s3:// (default ~/.cache/lorasuite/pipeline)")
    add_arguments(p.add_argument_group("migration options (per adapter)"), MigrationOptions)
    add_arguments(p.add_argument_group("pair analysis options"), AnalysisOptions)


#: The fields of lorasuite_core.training.config that become flags of ``train`` and ``eval``.
LORA_FLAGS = ("rank", "alpha", "targets")
TRAIN_FLAGS = ("lr", "epochs", "batch_size", "max_length", "warmup_ratio", "grad_accum", "lr_schedule",
               "max_grad_norm", "weight_decay", "seed", "autocast", "dtype", "device")
EVAL_FLAGS = ("batch_size", "max_new_tokens", "dtype", "device")


def build_parser() -> argparse.ArgumentParser:
    from lorasuite_core.pipeline.options import add_config_arguments
    from lorasuite_core.training.config import EvalConfig, LoraShape, TrainConfig

    parser = argparse.ArgumentParser(prog="lorasuite", description="Migrate LoRA adapters to an upgraded base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    migrate = sub.add_parser("migrate", help="migrate one adapter")
    _add_migrate_arguments(migrate)

    fleet = sub.add_parser("migrate-fleet", help="migrate every adapter of a fleet manifest (one pair analysis)")
    fleet.add_argument("--manifest", required=True, help="fleet manifest (YAML/JSON), local path or s3://…")
    fleet.add_argument("--overwrite", action="store_true", help="replace finished outputs instead of skipping them")
    fleet.add_argument("--cache-root", help="pair-analysis cache and result storage (default ~/.cache/lorasuite/pipeline)")

    train = sub.add_parser("train", help="train a fresh LoRA adapter (the vanilla baseline)")
    train.add_argument("--model", required=True, help="base model directory")
    train.add_argument("--data", default="builtin:train",
                       help="math_10k JSON/JSONL (path or URI), builtin:train or task:NAME:SPLIT[:COUNT]")
    train.add_argument("--samples", type=int, help="use the first N samples (built-in default 2000)")
    train.add_argument("--output", required=True, help="directory (or URI) for the PEFT adapter, published atomically "
                                                        "with a completion manifest")
    train.add_argument("--overwrite", action="store_true", help="replace our earlier publication at --output")
    add_config_arguments(train.add_argument_group("adapter"), LoraShape, LORA_FLAGS)
    add_config_arguments(train.add_argument_group("training"), TrainConfig, TRAIN_FLAGS)

    evaluate = sub.add_parser("eval", help="exact-match accuracy of a base model or an adapter on a data set")
    evaluate.add_argument("--model", required=True, help="base model directory")
    evaluate.add_argument("--adapter", help="PEFT adapter (omit to evaluate the base model)")
    evaluate.add_argument("--data", default="builtin:test",
                          help="math_10k JSON/JSONL (path or URI), builtin:test or task:NAME:SPLIT[:COUNT]")
    evaluate.add_argument("--samples", type=int, help="use the first N samples (built-in default 500)")
    evaluate.add_argument("--seed", type=int, default=1, help="seed of the built-in problems (default 1)")
    evaluate.add_argument("--output", help="write the result (with per-item predictions) as JSON here (a new file, "
                                           "or an earlier result of ours with --overwrite)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier result of ours at --output")
    add_config_arguments(evaluate.add_argument_group("evaluation"), EvalConfig, EVAL_FLAGS)

    models = sub.add_parser("models", help="real pretrained models without a hub")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="fetch and convert the known models (idempotent, checksum-verified)")
    fetch.add_argument("names", nargs="*", help="model names (default: the demo's pair; others by name)")
    fetch.add_argument("--cache-dir", help="default: $LORASUITE_MODELS_DIR or ~/.cache/lorasuite/models")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again")

    demo = sub.add_parser("demo", help="the main job: SmolLM2-135M -> Gemma-3-270M with LFT and evaluation "
                                       "(--synthetic: an exact synthetic upgrade instead)")
    demo.add_argument("--workdir", default="runs/demo", help="where the demo writes models and adapters")
    demo.add_argument("--synthetic", action="store_true", help="built-in synthetic upgrade; checks exactness")
    demo.add_argument("--family", default="llama", help="family of the synthetic model")
    demo.add_argument("--train-samples", type=int, default=200, help="samples for the old adapter")
    demo.add_argument("--lft-samples", type=int, default=100)
    demo.add_argument("--eval-samples", type=int, default=50)
    return parser


def _configure_logging(args):
    from lorasuite_core.io import logsetup
    from lorasuite_core.io.uris import register_secrets_in

    register_secrets_in(*(v for v in vars(args).values() if isinstance(v, str)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")   # no telemetry from the embedded API
    os.environ.setdefault("DO_NOT_TRACK", "1")   # nor from the client (and no first-run notice on the terminal)
    path = logsetup.configure(args.command, verbose=args.verbose, quiet=args.quiet)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()     # transformers' own lines: through logging, so the log file only
    hf_logging.enable_propagation()
    if not args.verbose:                     # one progress bar: lorasuite's
        hf_logging.disable_progress_bar()
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")   # read when datasets is imported
    if args.quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        hf_logging.set_verbosity_error()
    return path


def _run_migrate(args) -> dict:
    from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions, from_arguments

    from .entrypoints import run_migrate_adapter

    options = from_arguments(args, MigrationOptions).check_single()
    analysis = from_arguments(args, AnalysisOptions)
    if options.route == "transfer" and not options.runs_lft and options.lft is None:
        log.warning("transfer only (no --lft-data): without light fine-tuning a migrated adapter is often little "
                    "better than the bare new model; pass --lft-data, or --no-lft to say so")
    result = run_migrate_adapter(args.old_model, args.new_model, args.adapter, args.output, options, analysis,
                                 overwrite=args.overwrite, cache_root=args.cache_root)
    return {"summary": result.get("summary", result)}


def _run_migrate_fleet(args) -> dict:
    from .entrypoints import run_migrate_fleet

    result = run_migrate_fleet(args.manifest, overwrite=args.overwrite, cache_root=args.cache_root)
    for failed in result.get("failed", []):
        log.warning("adapter %s failed at %s", failed["name"], failed["error"])
    summary = {key: result[key] for key in ("published", "skipped", "failed") if key in result}
    return {"summary": summary, "exit_code": 1 if result.get("failed") else 0}


def _run_demo(args) -> dict:
    from .demo import run_real_demo, run_synthetic_demo

    if args.synthetic:
        return run_synthetic_demo(args.workdir, family=args.family, progress=not args.quiet)
    return run_real_demo(args.workdir, train_samples=args.train_samples, lft_samples=args.lft_samples,
                         eval_samples=args.eval_samples, progress=not args.quiet)


def _data_input(ref: str | None) -> str | None:
    """A data reference as an input to protect (built-in data lives nowhere on disk)."""
    return None if not ref or ref.startswith("builtin:") else ref


def _run_train(args) -> dict:
    from lorasuite_core.io.outputs import check_output
    from lorasuite_core.io.publish import publishing
    from lorasuite_core.training.samples import load_samples
    from lorasuite_core.pipeline.options import config_from_arguments
    from lorasuite_core.training.config import LoraShape, TrainConfig
    from lorasuite_core.training.train import SUMMARY_FILE, train_lora

    check_output(args.output, {"model": args.model, "training data": _data_input(args.data)}, args.overwrite)
    config = config_from_arguments(args, TrainConfig, TRAIN_FLAGS, show_progress=not args.quiet)
    shape = config_from_arguments(args, LoraShape, LORA_FLAGS)
    samples = load_samples(args.data, args.samples, seed=config.seed, default_count=2000)
    with publishing(args.output, overwrite=args.overwrite, kind="train") as staged:
        result = _library_call(train_lora, args.model, samples, staged, rank=shape.rank, alpha=shape.alpha,
                               targets=shape.target_list, config=config)
        summary_file = staged / SUMMARY_FILE            # name the published place, not the staging directory
        written = json.loads(summary_file.read_text())
        written["result"]["out_dir"] = args.output
        summary_file.write_text(json.dumps(written, indent=2))
    summary = {k: v for k, v in result.to_dict().items() if k != "losses"}
    return {"summary": {**summary, "out_dir": args.output}}


def _run_eval(args) -> dict:
    from dataclasses import asdict

    from lorasuite_core.io.files import write_text_atomic
    from lorasuite_core.io.outputs import FILE_FORMAT_KEY, check_output_file
    from lorasuite_core.pipeline.options import config_from_arguments
    from lorasuite_core.training.config import EvalConfig
    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.samples import load_samples

    if args.output:
        check_output_file(args.output, {"model": args.model, "adapter": args.adapter,
                                        "evaluation data": _data_input(args.data)}, args.overwrite)
    samples = load_samples(args.data, args.samples, seed=args.seed, default_count=500)
    config = config_from_arguments(args, EvalConfig, EVAL_FLAGS)
    result = _library_call(evaluate, args.model, samples, adapter_dir=args.adapter, **asdict(config),
                           show_progress=not args.quiet)
    if args.output:
        document = {FILE_FORMAT_KEY: "lorasuite.evaluation/v1", **result.to_dict(with_predictions=True)}
        write_text_atomic(args.output, json.dumps(document, indent=2, default=str) + "\n")
    return {"summary": result.to_dict()}


def _run_models(args) -> dict:
    from pathlib import Path

    from lorasuite_core.models.model_fetch import DEFAULT_MODELS, KNOWN_MODELS, check_fetch_location, fetch_model

    names = args.names or list(DEFAULT_MODELS)
    unknown = [n for n in names if n not in KNOWN_MODELS]
    if unknown:
        raise LorasuiteError(f"unknown model {unknown[0]!r}; known: {', '.join(KNOWN_MODELS)}")
    cache = Path(args.cache_dir) if args.cache_dir else None
    for name in names:
        check_fetch_location(name, cache)
    return {"summary": {n: str(_library_call(fetch_model, n, cache, force=args.force)) for n in names}}


def _library_call(fn, *args, **kwargs):
    """Training/eval/fetch code raises ValueError/FileNotFoundError for bad input: one line each."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise LorasuiteError(str(exc)) from exc


COMMANDS = {"migrate": _run_migrate, "migrate-fleet": _run_migrate_fleet, "demo": _run_demo, "train": _run_train, "eval": _run_eval, "models": _run_models}


def _run_command(args):
    """The command; then the terminal's last stage lines and its progress bar closed, before any final line."""
    from lorasuite_core.io.logsetup import finish_terminal

    try:
        return COMMANDS[args.command](args)
    finally:
        finish_terminal()


def _error_line(exc: BaseException) -> str:
    from lorasuite_core.io.uris import describe_error, redact_text

    if isinstance(exc, LorasuiteError):
        return redact_text(" ".join(str(exc).split()))
    text = describe_error(exc)
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in text:
        text += f" ({redact_text(str(exc.filename))})"
    return text


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make torch several times slower on a shared CPU (measured:
    # benchmarks/EVAL_THROUGHPUT.md); read when torch first starts OpenMP, so set before any tensor work
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    log_file = _configure_logging(args)
    from lorasuite_core.io.tempdirs import clean_stale

    clean_stale()     # temporary directories of earlier runs killed with SIGKILL
    try:
        result = _run_command(args)
    except (LorasuiteError, OSError) as exc:
        log.info("failed", exc_info=True, extra=FILE_ONLY)
        print(f"lorasuite: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorasuite: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: the traceback goes to the log file, one line here
        log.error("unexpected error", exc_info=True, extra=FILE_ONLY)
        print(f"lorasuite: error: unexpected {_error_line(exc)} (traceback in {log_file})", file=sys.stderr)
        return 1
    if isinstance(result, dict) and "summary" in result:
        print(json.dumps(result["summary"], indent=1, default=str))
    log.info("log file: %s", log_file)
    return result.get("exit_code", 0) if isinstance(result, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
