"""Migration benchmark: LoRASuite transfer (+ LFT) against retraining, on two real upgrade pairs.

Pairs
  cross   SmolLM2-135M-Instruct (old) -> Gemma-3-270M (new)                  (cross-family)
  within  SmolLM2-135M-Instruct -> a larger model derived from it by the project's
          function-preserving upgrade generator (wider residual stream, more heads, more layers,
          more neurons, a larger renumbered vocabulary), then continued pre-training of ALL
          weights on the CPython documentation topics shipped in ``pydoc_data.topics``
          (reproducible on any CPython 3.11 install), so the pair is no longer exact.

Rows (same seeds everywhere; LoRA rank 16 on q, k, v, o, gate, up, down)
  new_base            new base model, no adapter
  old_adapter         old adapter (trained on N samples) on the old model — the reference
  vanilla_lora_100    fresh LoRA on the new model, 100 samples
  lorasuite_transfer  LoRASuite transfer only
  lorasuite_lft_100   LoRASuite + light fine-tuning on the same 100 samples (lr 9e-4, no warmup)
  full_retrain        fresh LoRA on the new model with the same N samples as the old adapter

Both pairs start from the same old model, samples and seed, so the old adapter and its evaluation are
computed once and shared (a file lock lets the two pairs run at the same time; the copied stage is
marked ``shared_with``). Every stage runs in a fresh child process, so its peak RSS is its own.
Results are written after every stage to ``<results>/<pair>.json`` and the run resumes from there,
so an interrupted benchmark keeps what it measured; a hand-written ``notes`` field (the conditions
of the run) survives later writes. ``--markdown`` renders the table.

Usage
  python benchmarks/migration_benchmark.py --pair cross  [--train-samples 2000 --test-samples 500]
  python benchmarks/migration_benchmark.py --pair within --derive-only    # only build the derived model
  LORASUITE_BENCH_THREADS=1 ...                                           # torch threads per stage
  python benchmarks/migration_benchmark.py --markdown
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import fcntl
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DIAGNOSIS_PROBLEMS = 48  # generations inspected by the within pair's drift diagnosis
ROW_ORDER = ("new_base", "old_adapter", "vanilla_lora_100", "lorasuite_transfer", "lorasuite_lft_100", "full_retrain")


# ----------------------------------------------------------------------------- stages (child processes)


def _threads():
    import os

    import torch

    torch.set_num_threads(int(os.environ.get("LORASUITE_BENCH_THREADS", multiprocessing.cpu_count())))


def stage_derive_within_model(old_dir: str, out_dir: str, cpt_steps: int, seed: int) -> dict:
    """Upgrade generator + continued pre-training of all weights on pydoc_data.topics."""
    _threads()
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir

    start = time.perf_counter()
    upgraded = Path(out_dir) / "upgraded"
    spec = UpgradeSpec(fold_norms=True, rotate_residual=True, widen_residual=48, extra_query_heads_per_group=1,
                       permute_heads=True, permute_neurons=True, extra_neurons=256, identity_layers=(10, 21),
                       extra_vocab=1000, renumber_vocab=True, seed=seed,
                       # the committed within-pair results were derived with random added lm_head rows (continued
                       # pre-training then trains them); "mean" would give another model from the same seed
                       added_token_logits="random")
    if not (upgraded / "config.json").exists():
        upgrade_model_dir(old_dir, upgraded, spec)
    upgrade_seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(upgraded)
    model = AutoModelForCausalLM.from_pretrained(upgraded, dtype=torch.float32)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    block, batch = 256, 4
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(cpt_steps):
        offsets = torch.randint(0, len(ids) - block - 1, (batch,))
        x = torch.stack([ids[o:o + block] for o in offsets])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        print(f"cpt step {step + 1}/{cpt_steps} loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    final = Path(out_dir) / "model"
    model.eval().save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    return {"model_dir": str(final), "upgrade_spec": {k: v for k, v in vars(spec).items()},
            "corpus": "pydoc_data.topics (CPython %s)" % sys.version.split()[0],
            "corpus_tokens": int(len(ids)), "cpt_steps": cpt_steps, "cpt_tokens_seen": cpt_steps * batch * block,
            "cpt_lr": 2e-5, "cpt_first_loss": losses[0] if losses else None, "cpt_last_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start, "upgrade_seconds": upgrade_seconds}


def stage_train(model_dir: str, out_dir: str, n: int, seed: int, rank: int, epochs: int) -> dict:
    _threads()
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.train import TrainConfig, train_lora

    samples = generate_problems(n, "train", seed)
    config = TrainConfig(lr=3e-4, epochs=epochs, batch_size=8, seed=seed, warmup_ratio=0.05)
    result = train_lora(model_dir, samples, out_dir, rank=rank, alpha=2 * rank, targets=TARGETS, config=config)
    return _train_dict(result)


def stage_lft(model_dir: str, adapter_dir: str, out_dir: str, n: int, seed: int, epochs: int) -> dict:
    _threads()
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.training.train import default_lft_config, light_finetune

    samples = generate_problems(n, "train", seed)
    result = light_finetune(model_dir, adapter_dir, samples, out_dir,
                            config=default_lft_config(epochs=epochs, batch_size=8, seed=seed))
    return _train_dict(result)


def stage_migrate(old_dir: str, new_dir: str, adapter_dir: str, out_dir: str) -> dict:
    _threads()
    import resource

    import shutil
    import tempfile

    from lorasuite_core.pipeline.stages import migrate_in_process

    start = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="lorasuite-bench-store-") as store:   # timed from an empty store
        report = migrate_in_process(old_dir, new_dir, adapter_dir, out_dir, store_root=store)
    import torch

    return {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps": report["steps"], "layer_mapping": report["layer_mapping"],
            "shared_vocabulary_size": report["shared_vocabulary_size"]}


def _adapter_deltas(adapter_dir: str, model_dir: str) -> dict:
    from lorasuite_core.models.families import family_for_model_type
    from lorasuite_core.models.loading import load_lora_adapter

    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    adapter = load_lora_adapter(adapter_dir, family_for_model_type(model_type))
    return {key: factors.delta() for key, factors in adapter.factors.items()}


def _generations(model_dir: str, adapter_dir: str, samples) -> dict:
    from lorasuite_core.training.evaluation import evaluate

    result = evaluate(model_dir, samples, adapter_dir=adapter_dir, batch_size=len(samples), max_new_tokens=40,
                      show_progress=False)
    return {"accuracy": result.accuracy, "n": len(samples), "generations": [p.generation for p in result.predictions]}


def stage_drift_diagnosis(old_dir: str, upgraded_dir: str, new_dir: str, adapter_dir: str, migrated_dir: str,
                          exact_dir: str, n_test: int, seed: int) -> dict:
    """Within pair: is transfer-only weak because of the transfer, or because continued pre-training moved the base?

    The same adapter is migrated to the upgraded model *before* continued pre-training, where the transfer is exact
    (the generator's ground truth), and compared with the one migrated to the continued-pre-trained model: per role,
    relative Frobenius distance of the LoRA deltas. A few greedy generations (kept in the results) then show what
    each adapter does: its accuracy on them, and how many state "The answer is N" within the 40 generated tokens.
    """
    stage_migrate(old_dir, upgraded_dir, adapter_dir, exact_dir)
    exact, drifted = _adapter_deltas(exact_dir, upgraded_dir), _adapter_deltas(migrated_dir, new_dir)
    if exact.keys() != drifted.keys():
        raise RuntimeError(f"the two migrations touched different modules: {sorted(exact.keys() ^ drifted.keys())}")
    by_role: dict[str, list[float]] = {}
    for key in exact:
        by_role.setdefault(key[1], []).append(float((drifted[key] - exact[key]).norm() / exact[key].norm()))
    from lorasuite_core.training.task_data import generate_problems

    samples = generate_problems(n_test, "test", seed)
    return {
        "delta_relative_distance": {role: {"mean": sum(v) / len(v), "max": max(v)} for role, v in sorted(by_role.items())},
        "generations": {
            "old_adapter_on_old_model": _generations(old_dir, adapter_dir, samples),
            "exact_transfer_on_upgraded_model": _generations(upgraded_dir, exact_dir, samples),
            "transfer_on_new_model": _generations(new_dir, migrated_dir, samples),
        },
    }


def stage_eval(model_dir: str, adapter_dir: str | None, n: int, seed: int, batch_size: int) -> dict:
    _threads()
    from lorasuite_core.training.evaluation import evaluate
    from lorasuite_core.training.task_data import generate_problems

    samples = generate_problems(n, "test", seed)
    result = evaluate(model_dir, samples, adapter_dir=adapter_dir, batch_size=batch_size, max_new_tokens=40,
                      keep_predictions=False)
    return result.to_dict()


def _train_dict(result) -> dict:
    data = result.to_dict()
    data.pop("losses", None)
    return data


def run_child(fn, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- orchestration


def _same_settings(a: dict | None, b: dict) -> bool:
    """Settings equal apart from the command line that produced them (a resumed run may spell it differently)."""
    strip = lambda c: {k: v for k, v in c.items() if k != "command"}
    return a is None or strip(a) == strip(b)


def _read_results(pair: str) -> dict:
    path = RESULTS / f"{pair}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def sharing_pair(pair: str, config: dict) -> str | None:
    """The other pair, when its shared settings (samples, rank, seed, epochs) match ours: it may share stages."""
    other = "within" if pair == "cross" else "cross"
    theirs = _read_results(other).get("config", {})
    keys = ("train_samples", "test_samples", "rank", "seed", "epochs")
    return other if all(theirs.get(k) == config[k] for k in keys) else None


class Results:
    """Per-pair stage results in ``<results>/<pair>.json``.

    Several processes may work on one pair at once (``--only``) and two pairs share stages, so every stage runs
    under a file lock, is re-read from disk before it is computed, and every write merges with what is on disk;
    a ``notes`` field edited by hand survives later writes.
    """

    def __init__(self, pair: str, config: dict, only: set[str] | None = None):
        self.path, self.pair, self.only = RESULTS / f"{pair}.json", pair, only
        with self._locked(f".{pair}.json.lock"):
            self.data = self._read()
            if not _same_settings(self.data.get("config"), config):
                print(f"settings changed: starting {self.path.name} afresh", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                self.data = {}
            self.data["config"] = config
            self.data.setdefault("stages", {})
            self.data.setdefault("notes", "")
        self.save()

    def _read(self) -> dict:
        return _read_results(self.pair)

    @staticmethod
    @contextlib.contextmanager
    def _locked(name: str):
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / name, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get(self, name, fn, *args, shared_with: str | None = None):
        """Stage ``name``: from disk when done (here, or in ``shared_with``'s pair), else computed now.

        With ``--only``, a stage not listed and not yet done is skipped (returns None).
        """
        if self.only is not None and name not in self.only:  # never wait for a stage this process will not run
            return self._read().get("stages", {}).get(name)
        with self._locked(f".{name}.lock" if shared_with else f".{self.pair}.{name}.lock"):
            self.data["stages"].update(self._read().get("stages", {}))
            if name not in self.data["stages"] and shared_with is not None:
                theirs = _read_results(shared_with).get("stages", {})
                if name in theirs:
                    self.data["stages"][name] = dict(theirs[name], shared_with=shared_with)
                    self.save()
            if name not in self.data["stages"]:
                print(f"[{self.pair}] {name} …", file=sys.stderr, flush=True)
                self.data["stages"][name] = run_child(fn, *args)
                self.save()
            return self.data["stages"][name]

    def save(self):
        with self._locked(f".{self.pair}.json.lock"):
            on_disk = self._read()
            merged = dict(self.data, stages={**on_disk.get("stages", {}), **self.data["stages"]})
            merged["config"] = on_disk.get("config", self.data["config"])  # first command wins; settings are equal
            if on_disk.get("notes"):
                merged["notes"] = on_disk["notes"]
            self.data = merged
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=2) + "\n")
            tmp.replace(self.path)


def _argv_without_only() -> list[str]:
    """The command line minus ``--only``: the stages it names are part of the same run."""
    argv, out = sys.argv[1:], []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--only":
            skip = True
        elif not arg.startswith("--only="):
            out.append(arg)
    return out


def run_pair(pair: str, args) -> None:
    from lorasuite_core.models.model_fetch import fetch_model

    config = {"pair": pair, "train_samples": args.train_samples, "test_samples": args.test_samples,
              "lft_samples": args.lft_samples, "rank": args.rank, "seed": args.seed, "epochs": args.epochs,
              "cpt_steps": args.cpt_steps if pair == "within" else None,
              "command": "python benchmarks/migration_benchmark.py " + " ".join(_argv_without_only())}
    res = Results(pair, config, only=set(args.only.split(",")) if args.only else None)
    work = Path(args.workdir) / pair
    old_dir = str(fetch_model("smollm2-135m-instruct"))
    if pair == "cross":
        new_dir = str(fetch_model("gemma3-270m"))
    else:
        new_dir = res.get("derive_new_model", stage_derive_within_model, old_dir, str(work / "derived"),
                          args.cpt_steps, args.seed)["model_dir"]
        if args.derive_only:
            return
    res.data["models"] = {"old": old_dir, "new": new_dir}
    seed, n, n_test, n_lft = args.seed, args.train_samples, args.test_samples, args.lft_samples
    # Both pairs start from the same old model, samples and seed: one old adapter (and its evaluation) serves both.
    other = sharing_pair(pair, config)
    old_adapter, migrated = str(Path(args.workdir) / f"old_adapter-n{n}-r{args.rank}-s{seed}"), str(work / "migrated")
    res.get("train_old_adapter", stage_train, old_dir, old_adapter, n, seed, args.rank, args.epochs, shared_with=other)
    res.get("transfer", stage_migrate, old_dir, new_dir, old_adapter, migrated)
    res.get("lft_100", stage_lft, new_dir, migrated, str(work / "lft"), n_lft, seed, args.lft_epochs)
    res.get("train_vanilla_100", stage_train, new_dir, str(work / "vanilla"), n_lft, seed, args.rank, args.lft_epochs)
    evals = {
        "new_base": (new_dir, None), "old_adapter": (old_dir, old_adapter),
        "lorasuite_transfer": (new_dir, migrated), "lorasuite_lft_100": (new_dir, str(work / "lft")),
        "vanilla_lora_100": (new_dir, str(work / "vanilla")),
    }
    for row, (model, adapter) in evals.items():
        res.get(f"eval_{row}", stage_eval, model, adapter, n_test, seed + 1, args.eval_batch,
                shared_with=other if row == "old_adapter" else None)
    if pair == "within":
        res.get("drift_diagnosis", stage_drift_diagnosis, old_dir, str(work / "derived" / "upgraded"), new_dir,
                old_adapter, migrated, str(work / "migrated-exact"), DIAGNOSIS_PROBLEMS, seed + 1)
    if args.retime_transfer:  # the transfer once more, alone on the machine with all cores (the ≤ 2 min target)
        res.get("transfer_retimed", stage_migrate, old_dir, new_dir, old_adapter, str(work / "migrated-retimed"))
    for epochs in args.short_lft_epochs:  # a cheaper LFT (and vanilla LoRA) beside the configured one
        lft_dir, vanilla_dir = str(work / f"lft-{epochs}ep"), str(work / f"vanilla-{epochs}ep")
        res.get(f"lft_100_{epochs}ep", stage_lft, new_dir, migrated, lft_dir, n_lft, seed, epochs)
        res.get(f"eval_lorasuite_lft_100_{epochs}ep", stage_eval, new_dir, lft_dir, n_test, seed + 1, args.eval_batch)
        res.get(f"train_vanilla_100_{epochs}ep", stage_train, new_dir, vanilla_dir, n_lft, seed, args.rank, epochs)
        res.get(f"eval_vanilla_lora_100_{epochs}ep", stage_eval, new_dir, vanilla_dir, n_test, seed + 1, args.eval_batch)
    if args.retime_full_retrain:  # full retraining once more, alone on the machine (like-for-like wall-time ratio)
        res.get("train_full_retimed", stage_train, new_dir, str(work / "full-retimed"), n, seed, args.rank, args.epochs)
    if not args.skip_full_retrain:
        res.get("train_full", stage_train, new_dir, str(work / "full"), n, seed, args.rank, args.epochs)
        res.get("eval_full_retrain", stage_eval, new_dir, str(work / "full"), n_test, seed + 1, args.eval_batch)


# ----------------------------------------------------------------------------- table


SHORT_ROW = re.compile(r"^(?P<base>lorasuite_lft_100|vanilla_lora_100)_(?P<epochs>\d+)ep$")


def rows(stages: dict) -> list[str]:
    """The fixed rows, each followed by its fewer-epoch variants (``--short-lft-epochs``) when measured."""
    short = sorted(n[len("eval_"):] for n in stages if n.startswith("eval_") and SHORT_ROW.match(n[len("eval_"):]))
    return [r for base in ROW_ORDER for r in [base] + [s for s in short if SHORT_ROW.match(s)["base"] == base]]


def lone_stage(stages: dict, name: str) -> str:
    """``name`` re-timed alone on the machine (``--retime-*``) when there is such a stage, else ``name``."""
    return f"{name}_retimed" if f"{name}_retimed" in stages else name


def row_stages(stages: dict, row: str) -> dict[str, str]:
    """Label -> stage name of the work that produced a row (its evaluation aside).

    Fewer-epoch rows ran alone on the machine, so they are timed with the transfer re-timed alone.
    """
    short = SHORT_ROW.match(row)
    if short and short["base"] == "lorasuite_lft_100":
        return {"transfer": lone_stage(stages, "transfer"), "lft": f"lft_100_{short['epochs']}ep"}
    if short:
        return {"train": f"train_vanilla_100_{short['epochs']}ep"}
    return {
        "new_base": {},
        "old_adapter": {"train": "train_old_adapter"},
        "vanilla_lora_100": {"train": "train_vanilla_100"},
        "lorasuite_transfer": {"transfer": "transfer"},
        "lorasuite_lft_100": {"transfer": "transfer", "lft": "lft_100"},
        "full_retrain": {"train": "train_full"},
    }[row]


def _row_stage_seconds(stages: dict, row: str) -> dict:
    return {label: stages.get(name, {}).get("seconds") for label, name in row_stages(stages, row).items()}


def _peak(stages: dict, row: str) -> float | None:
    names = list(row_stages(stages, row).values()) + [f"eval_{row}"]
    values = [stages[n].get("peak_rss_mb") for n in names if n in stages]
    return max(values) if values else None


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def targets(stages: dict, pair: str) -> list[str]:
    acc = lambda row: stages.get(f"eval_{row}", {}).get("accuracy")
    secs = lambda name: stages.get(name, {}).get("seconds")
    lines = []

    def check(label, ok):
        lines.append(f"- {label}: {'met' if ok else 'NOT met' if ok is not None else 'not measured'}")

    for lft in (r for r in rows(stages) if r.startswith("lorasuite_lft_100")):
        vanilla = "vanilla_lora_100" + lft[len("lorasuite_lft_100"):]          # the same number of epochs
        a, b = acc(lft), acc(vanilla)
        check(f"LoRASuite + LFT-100 above vanilla LoRA-100 ({lft} vs {vanilla})", None if None in (a, b) else a > b)
        if pair == "within":
            c = acc("full_retrain")
            check(f"LoRASuite + LFT-100 at or above full retraining ({lft})", None if None in (a, c) else a >= c)
        named = row_stages(stages, lft)
        # like with like: a row timed with the lone transfer is compared with full retraining timed alone
        full = lone_stage(stages, "train_full") if named["transfer"] == "transfer_retimed" else "train_full"
        t, l, f = secs(named["transfer"]), secs(named["lft"]), secs(full)
        check(f"transfer + LFT wall time ≤ 10% of full retraining ({lft})", None if None in (t, l, f) else t + l <= 0.1 * f)
        if None not in (t, l, f):
            lines[-1] += (f" ({named['transfer']} {t:.0f} s + {named['lft']} {l:.0f} s = {100 * (t + l) / f:.1f}% "
                          f"of {full} {f:.0f} s)")
    if pair == "cross":
        alone = secs(lone_stage(stages, "transfer"))
        check("transfer alone ≤ 2 minutes", None if alone is None else alone <= 120)
        if alone is not None:
            lines[-1] += f" ({alone:.0f} s" + (", re-timed alone on the machine with "
                                               f"{stages['transfer_retimed'].get('threads', '?')} threads)"
                                               if "transfer_retimed" in stages else ")")
    return lines


def _cell(text: str) -> str:
    return "`" + text.replace("\n", " ").replace("|", "\\|").replace("`", "'") + "`"


def diagnosis_lines(diag: dict) -> list[str]:
    from lorasuite_core.training.evaluation import ANSWER_SENTENCE

    distance = ", ".join(f"{role} {d['mean']:.4f} (max {d['max']:.4f})" for role, d in diag["delta_relative_distance"].items())
    answered = lambda g: sum(bool(ANSWER_SENTENCE.search(t)) for t in g["generations"]) / len(g["generations"])
    table = [f"| {name.replace('_', ' ')} | {g['accuracy']:.3f} | {answered(g):.2f} | {_cell(g['generations'][0])} |"
            for name, g in diag["generations"].items()]
    n = next(iter(diag["generations"].values()))["n"]
    return ["Drift diagnosis: relative Frobenius distance of the transferred LoRA deltas from those the same transfer "
            "gives on the upgraded model before continued pre-training (where it is exact), mean over layers "
            f"(max): {distance}.", "",
            f"| adapter (first {n} test problems) | accuracy | states \"The answer is N\" | first generation |",
            "| --- | --- | --- | --- |", *table, ""]


def transfer_stage_lines(name: str, steps: dict) -> list[str]:
    """A transfer's stage times, split into the per-model-pair analysis (cached: paid once per fleet) and the rest."""
    from lorasuite_core.pipeline.stages import PAIR_STAGES

    seconds = {k: v["seconds"] for k, v in steps.items() if isinstance(v, dict) and v.get("seconds") is not None}
    pair = sum(v for k, v in seconds.items() if k in PAIR_STAGES)
    return [f"Stages of {name} (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; per model pair (cached, once per fleet) {pair:.0f}, per adapter {sum(seconds.values()) - pair:.0f}.", ""]


def markdown() -> str:
    out = ["# Migration benchmark results", ""]
    for path in [RESULTS / f"{pair}.json" for pair in ("cross", "within")]:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        stages, cfg = data["stages"], data["config"]
        out += [f"## {cfg['pair']}: {data.get('models', {}).get('old', '?')} → {data.get('models', {}).get('new', '?')}", "",
                f"Command: `{cfg['command']}`", "",
                f"N = {cfg['train_samples']} training samples, {cfg['test_samples']} test problems, "
                f"LFT / vanilla on {cfg['lft_samples']} samples, LoRA rank {cfg['rank']}, seed {cfg['seed']}.", ""]
        if data.get("notes"):
            out += [f"Conditions: {data['notes']}", ""]
        if "derive_new_model" in stages:
            d = stages["derive_new_model"]
            out += [f"New model: upgrade generator + continued pre-training on {d['corpus']} "
                    f"({d['corpus_tokens']} tokens in the corpus, {d['cpt_tokens_seen']} tokens seen in {d['cpt_steps']} steps, "
                    f"lr {d['cpt_lr']}, loss {_fmt(d['cpt_first_loss'], 3)} → {_fmt(d['cpt_last_loss'], 3)}).", ""]
        out += ["| row | accuracy | 95% CI | n | train / transfer / LFT s | eval s | peak RSS MB |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows(stages):
            ev = stages.get(f"eval_{row}")
            times = ", ".join(f"{k} {v:.0f}" for k, v in _row_stage_seconds(stages, row).items() if v is not None)
            if ev is None:
                out.append(f"| {row} | not run | | | {times} | | |")
                continue
            shared = f" (shared with {ev['shared_with']})" if ev.get("shared_with") else ""
            out.append(f"| {row}{shared} | {ev['accuracy']:.3f} | [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}] | {ev['n']} | "
                       f"{times or '—'} | {ev['seconds']:.0f} | {_fmt(_peak(stages, row), 0)} |")
        out += ["", "Targets:"] + targets(stages, cfg["pair"]) + [""]
        if "drift_diagnosis" in stages:
            out += diagnosis_lines(stages["drift_diagnosis"])
        for name in ("transfer", "transfer_retimed"):
            if name in stages:
                out += transfer_stage_lines(name, stages[name]["steps"])
    return "\n".join(out)


def _epoch_list(text: str) -> list[int]:
    try:
        epochs = [int(e) for e in text.split(",")]
    except ValueError:
        epochs = []
    if not epochs or min(epochs) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch counts >= 1, got {text!r}")
    return epochs


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=["cross", "within", "both"], default="both")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--lft-samples", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lft-epochs", type=int, default=2,
                   help="epochs of the lft_100 / vanilla_lora_100 rows (2 in the committed results; `lorasuite migrate` "
                        "defaults to 1, which --short-lft-epochs 1 measures)")
    p.add_argument("--retime-full-retrain", action="store_true",
                   help="train the full-retraining adapter once more on its own, for a like-for-like wall-time ratio")
    p.add_argument("--short-lft-epochs", type=_epoch_list, default=[],
                   help="also run LFT and vanilla LoRA with these (fewer) epochs, e.g. 1: rows lorasuite_lft_100_<E>ep and "
                        "vanilla_lora_100_<E>ep, timed against the lone transfer and full retraining when re-timed "
                        "(run them alone on the machine)")
    p.add_argument("--cpt-steps", type=int, default=40)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full-retrain", action="store_true")
    p.add_argument("--derive-only", action="store_true", help="within pair: derive the new model, then stop")
    p.add_argument("--retime-transfer", action="store_true",
                   help="run the transfer once more on its own (start it when the machine is otherwise idle)")
    p.add_argument("--only", help="comma-separated stage names: compute only these (e.g. train_full,eval_full_retrain), "
                                  "so a second process can share a pair's work")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "benchmark"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="directory of the per-pair JSON results")
    p.add_argument("--markdown", action="store_true", help="render benchmarks/results/*.json to RESULTS.md and stop")
    args = p.parse_args()
    RESULTS = Path(args.results)
    if not args.markdown:
        for pair in (["cross", "within"] if args.pair == "both" else [args.pair]):
            run_pair(pair, args)
    text = markdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "RESULTS.md" if RESULTS == ROOT / "benchmarks" / "results" else RESULTS / "RESULTS.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
