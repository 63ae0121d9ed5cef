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


def build_parser() -> argparse.ArgumentParser:
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
    train.add_argument("--output", required=True)
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=float, default=32)
    train.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true")

    evaluate = sub.add_parser("eval", help="exact-match accuracy of a base model or an adapter on a data set")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--adapter", help="PEFT adapter (omit to evaluate the base model)")
    evaluate.add_argument("--data", default="builtin:test",
                          help="math_10k JSON/JSONL (path or URI), builtin:test or task:NAME:SPLIT[:COUNT]")
    evaluate.add_argument("--samples", type=int, help="use the first N samples (built-in default 500)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                          help="auto: bfloat16 on CPUs with AVX512-BF16/AMX and bf16 GPUs, else float32")
    evaluate.add_argument("--max-new-tokens", type=int, help="default: the task's (arithmetic 64)")
    evaluate.add_argument("--seed", type=int, default=1)
    evaluate.add_argument("--output", help="write the result (with per-item predictions) as JSON here")

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
    from lorasuite_core.io.storage import register_secrets_in

    register_secrets_in(*(v for v in vars(args).values() if isinstance(v, str)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")   # no telemetry from the embedded API
    path = logsetup.configure(args.command, verbose=args.verbose, quiet=args.quiet)
    if args.quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return path


def _run_migrate(args) -> dict:
    from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions, from_arguments

    from .entrypoints import run_migrate_adapter

    options = from_arguments(args, MigrationOptions).check_single()
    analysis = from_arguments(args, AnalysisOptions)
    if not options.runs_lft and options.lft is None:
        log.warning("transfer only (no --lft-data): without light fine-tuning a migrated adapter is often little "
                    "better than the bare new model; pass --lft-data, or --no-lft to say so")
    result = run_migrate_adapter(args.old_model, args.new_model, args.adapter, args.output, options, analysis,
                                 overwrite=args.overwrite, cache_root=args.cache_root)
    return {"summary": result.get("summary", result)}


def _run_migrate_fleet(args) -> dict:
    from .entrypoints import run_migrate_fleet

    result = run_migrate_fleet(args.manifest, overwrite=args.overwrite, cache_root=args.cache_root)
    summary = {key: result[key] for key in ("published", "skipped", "failed") if key in result}
    return {"summary": summary, "exit_code": 1 if result.get("failed") else 0}


def _run_demo(args) -> dict:
    from .demo import run_real_demo, run_synthetic_demo

    if args.synthetic:
        return run_synthetic_demo(args.workdir, family=args.family, progress=not args.quiet)
    return run_real_demo(args.workdir, train_samples=args.train_samples, lft_samples=args.lft_samples,
                         eval_samples=args.eval_samples, progress=not args.quiet)


def _run_train(args) -> dict:
    from lorasuite_core.transfer.adapter import check_output_dir
    from lorasuite_core.training.samples import load_samples
    from lorasuite_core.training.train import TrainConfig, train_lora

    check_output_dir(args.output, args.overwrite)
    samples = load_samples(args.data, args.samples, seed=args.seed, default_count=2000)
    config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         show_progress=not args.quiet)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    result = _library_call(train_lora, args.model, samples, args.output, rank=args.rank, alpha=args.alpha,
                           targets=targets, config=config)
    return {"summary": {k: v for k, v in result.to_dict().items() if k != "losses"}}


def _run_eval(args) -> dict:
    from pathlib import Path

    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.samples import load_samples

    samples = load_samples(args.data, args.samples, seed=args.seed, default_count=500)
    result = _library_call(evaluate, args.model, samples, adapter_dir=args.adapter, batch_size=args.batch_size,
                           dtype=args.dtype,
                           max_new_tokens=args.max_new_tokens, show_progress=not args.quiet)
    if args.output:
        Path(args.output).write_text(json.dumps(result.to_dict(with_predictions=True), indent=2, default=str) + "\n")
    return {"summary": result.to_dict()}


def _run_models(args) -> dict:
    from pathlib import Path

    from lorasuite_core.models.model_fetch import DEFAULT_MODELS, KNOWN_MODELS, fetch_model

    names = args.names or list(DEFAULT_MODELS)
    unknown = [n for n in names if n not in KNOWN_MODELS]
    if unknown:
        raise LorasuiteError(f"unknown model {unknown[0]!r}; known: {', '.join(KNOWN_MODELS)}")
    cache = Path(args.cache_dir) if args.cache_dir else None
    return {"summary": {n: str(_library_call(fetch_model, n, cache, force=args.force)) for n in names}}


def _library_call(fn, *args, **kwargs):
    """Training/eval/fetch code raises ValueError/FileNotFoundError for bad input: one line each."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise LorasuiteError(str(exc)) from exc


COMMANDS = {"migrate": _run_migrate, "migrate-fleet": _run_migrate_fleet, "demo": _run_demo, "train": _run_train, "eval": _run_eval, "models": _run_models}


def _error_line(exc: BaseException) -> str:
    from lorasuite_core.io.storage import describe_error, redact_text

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
    try:
        result = COMMANDS[args.command](args)
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
