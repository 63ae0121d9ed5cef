"""Migration benchmark: LoRASuite transfer (+ LFT / distillation) against retraining, on real upgrade pairs.

Pairs (the default set is cross and qwen)
  cross   SmolLM2-135M-Instruct (old) -> Gemma-3-270M (new)                   (cross-family)
  qwen    Qwen2.5-Coder-0.5B-Instruct -> Qwen2.5-Coder-1.5B-Instruct          (within family, real)
  within  the earlier synthetic within pair, kept for its committed results: SmolLM2-135M-Instruct -> a larger
          model derived from it by the project's function-preserving upgrade generator (wider residual stream,
          more heads, layers, neurons, a larger renumbered vocabulary), then continued pre-training of ALL weights
          on the CPython documentation topics shipped in ``pydoc_data.topics``, so the pair is no longer exact.

Rows (same seeds everywhere; LoRA rank 16 on q, k, v, o, gate, up, down; test problems: builtin test split, seed + 1)
  new_base                  new base model, no adapter
  old_adapter               old adapter (trained on N samples) on the old model: the reference
  vanilla_lora_100          fresh LoRA on the new model, 100 labelled samples
  lorasuite_transfer        LoRASuite transfer only
  lorasuite_lft_100         + labelled light fine-tuning on the same 100 samples (lr 9e-4, no warmup); within:
                            training.light_finetune on the transferred adapter (2 epochs); qwen: the stage
                            graph's labelled LFT (--graph-lft-epochs); not a cross row since ALGORITHM_VERSION 2
  lorasuite_lft_100_graph   cross: labelled LFT-100 through the stage graph, options as the distill rows (the
                            like-for-like labelled peer of lorasuite_distill_100: same code, zero-init, eval dtype)
  lorasuite_distill_100     + LFT distilled from the teacher (old model + old adapter) on the same 100 training
                            prompts without their answers (32 more held-out prompts measure teacher agreement)
  lorasuite_distill_seed5   + distillation on 100 prompts the teacher writes in the style of 5 seed prompts
  full_retrain              fresh LoRA on the new model with the same N samples as the old adapter
  ablation_sequential_*     layer mapping sequential instead of CKA          (_transfer, _distill_100)
  ablation_identity_heads_* head mapping identity instead of Hungarian       (_transfer, _distill_100)

Every migration runs through the one stage graph (``lorasuite_core.pipeline.runner.migrate_in_process``) over a
per-pair stage store (``<workdir>/<pair>/store``), so the pair analysis is computed once and the distill and
ablation rows recompute only what their options change; the report's per-stage seconds time each row. Every stage
runs in a fresh child process (its peak RSS and CPU seconds are its own; the load average at its start and end is
recorded). Results are written after every stage to ``<results>/<pair>.json`` and the run resumes from there, so an
interrupted benchmark keeps what it measured; a hand-written ``notes`` field (the conditions of the run) survives
later writes. Artifacts a recorded stage produced but that are gone from the work directory (a fresh machine) are
rebuilt when a new row needs them (``rebuilt_<stage>``, with a check that the retraining reproduced the recorded
final loss). ``--markdown`` renders the table.

Differences between two rows are stated with Newcombe's interval for a difference of proportions, built from the
two rows' Wilson intervals; a difference whose 95% interval contains 0 is "inside the noise". Rows evaluated on the
same test problems are paired (each row records which problems it solved), so the interval is the paired one
(Newcombe 1998, "paired data", method 10): with r problems both rows solve, s only the first, t only the second and
u neither (n in all), p1 = (r+s)/n, p2 = (r+t)/n, Wilson limits l_i, u_i, and the correlation of the two
proportions estimated from A = r·u − s·t as psi = (A − n/2)/√((r+s)(t+u)(r+t)(s+u)) when A > n/2, A/√(…) when
A < 0, else 0 (0 also when a margin is empty),

    d = p1 − p2,  low = d − √((p1−l1)² − 2·psi·(p1−l1)(u2−p2) + (u2−p2)²),
                  high = d + √((p2−l2)² − 2·psi·(p2−l2)(u1−p1) + (u1−p1)²).

psi = 0 gives the interval for independent samples (Newcombe 1998, method 10 of the independent case), which is
used where a row lacks its per-problem results; rows that agree on most problems get a much narrower interval.
The interval covers the sampling of test problems only: each row is one training run (seed 0), so how much a row
would move with another training seed is not in it.

Usage
  python benchmarks/migration_benchmark.py --pair cross                  # N = 2000, 500 test problems
  python benchmarks/migration_benchmark.py --pair qwen                   # 200 test problems, LFT rows 1 epoch
  python benchmarks/migration_benchmark.py --pair within --derive-only   # only build the derived model
  LORASUITE_BENCH_THREADS=1 ...                                          # torch threads per stage
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
BASE_ROWS = ("new_base", "old_adapter", "vanilla_lora_100", "lorasuite_transfer", "lorasuite_lft_100")
GRAPH_ROWS = ("lorasuite_lft_100_graph", "lorasuite_distill_100", "lorasuite_distill_seed5")
ABLATIONS = {  # name -> (what it changes, AnalysisOptions fields)
    "sequential": ("CKA -> sequential layer mapping", {"layer_mapping": "sequential"}),
    "identity_heads": ("Hungarian -> identity head mapping", {"head_mapping": "identity"}),
}
ABLATION_ROWS = tuple(f"ablation_{a}_{kind}" for a in ABLATIONS for kind in ("transfer", "distill_100"))
ROW_ORDER = BASE_ROWS + GRAPH_ROWS + ("full_retrain",) + ABLATION_ROWS
#: Rows each pair measures (the within pair is the earlier synthetic pair: its rows as committed).
PAIR_ROWS = {"cross": tuple(r for r in ROW_ORDER if r != "lorasuite_lft_100"),  # its labelled row: *_lft_100_graph
             "qwen": tuple(r for r in ROW_ORDER if r != "lorasuite_lft_100_graph"),
             "within": BASE_ROWS + ("full_retrain",)}
MODELS = {"cross": ("smollm2-135m-instruct", "gemma3-270m"),
          "qwen": ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"),
          "within": ("smollm2-135m-instruct", None)}
HELDOUT_PROMPTS = 32  # MigrationOptions.gate_prompts: distillation's held-out prompts (teacher agreement)
SEED_PROMPTS = 5


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
    from lorasuite_core.training.config import TrainConfig
    from lorasuite_core.training.train import train_lora

    samples = generate_problems(n, "train", seed)
    config = TrainConfig(lr=3e-4, epochs=epochs, batch_size=8, seed=seed, warmup_ratio=0.05)
    result = train_lora(model_dir, samples, out_dir, rank=rank, alpha=2 * rank, targets=TARGETS, config=config)
    return _train_dict(result)


def stage_lft(model_dir: str, adapter_dir: str, out_dir: str, n: int, seed: int, epochs: int) -> dict:
    _threads()
    from lorasuite_core.training.task_data import generate_problems
    from lorasuite_core.pipeline.options import MigrationOptions
    from lorasuite_core.training.config import default_lft_config
    from lorasuite_core.training.train import light_finetune

    samples = generate_problems(n, "train", seed)
    result = light_finetune(model_dir, adapter_dir, samples, out_dir,
                            config=default_lft_config(MigrationOptions().lft_lr, epochs=epochs, batch_size=8, seed=seed))
    return _train_dict(result)


def stage_migrate(old_dir: str, new_dir: str, adapter_dir: str, out_dir: str, cache_root: str | None = None) -> dict:
    """Transfer only. Without ``cache_root``, timed from an empty temporary store; with one (the pair's store, empty
    when this is its first migration), the pair analysis it computes is kept for the other rows
    (``pair_stages_reused`` lists what an earlier, interrupted run had already stored)."""
    import tempfile

    with contextlib.ExitStack() as stack:
        store = cache_root or stack.enter_context(tempfile.TemporaryDirectory(prefix="lorasuite-bench-store-"))
        result = stage_graph_migrate(old_dir, new_dir, adapter_dir, out_dir, store, {}, {})
    for key in ("options", "analysis", "light_finetune", "lft_seconds", "out_dir"):
        result.pop(key, None)
    return result


def stage_graph_migrate(old_dir: str, new_dir: str, adapter_dir: str, out_dir: str, cache_root: str,
                        migration: dict, analysis: dict) -> dict:
    """One migration through the stage graph with ``MigrationOptions(**migration)``, ``AnalysisOptions(**analysis)``.

    ``lft_seconds``: the report's LFT step (labelled or distilled: teacher completions, agreement before and after,
    training), the part a row adds to the transfer.
    """
    _threads()
    import resource
    import shutil

    import torch

    from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
    from lorasuite_core.pipeline.graph import PAIR_STAGES
    from lorasuite_core.pipeline.runner import migrate_in_process

    start = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    report = migrate_in_process(old_dir, new_dir, adapter_dir, out_dir, MigrationOptions(**migration),
                                AnalysisOptions(**analysis), cache_root=cache_root)
    steps = report["steps"]
    return {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps": steps, "layer_mapping": report.get("layer_mapping"),      # absent: a fresh LoRA was published
            "shared_vocabulary_size": report.get("shared_vocabulary_size"),
            "pair_stages_reused": [k for k in PAIR_STAGES if steps.get(k, {}).get("cache") == "reused"],
            "lft_seconds": steps.get("lft", {}).get("seconds"),
            "light_finetune": report.get("light_finetune"), "route": report.get("route"),
            "fidelity": report.get("fidelity"), "options": migration, "analysis": analysis, "out_dir": out_dir}


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
                      keep_predictions=True, show_progress=False)
    data = result.to_dict()
    # per problem, in order: 1 correct, 0 not (for paired comparisons later)
    data["correct_mask"] = "".join("1" if p.correct else "0" for p in result.predictions)
    return data


def _train_dict(result) -> dict:
    data = result.to_dict()
    data.pop("losses", None)
    return data


def _measured(fn, *args) -> dict:
    """``fn(*args)`` with the child process's CPU seconds (user + system, the whole process) and the load average
    at its start and end: wall time on a shared machine depends on the load, CPU time much less."""
    import resource

    load_start = os.getloadavg()
    result = fn(*args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return dict(result, cpu_seconds=usage.ru_utime + usage.ru_stime,
                loadavg_start=[round(x, 2) for x in load_start], loadavg_end=[round(x, 2) for x in os.getloadavg()],
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def run_child(fn, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, *args).result()


def write_distill_prompts(path: Path, n: int, seed: int, n_heldout: int = HELDOUT_PROMPTS) -> Path:
    """The prompts of the labelled rows' ``n`` training samples, without answers, as a math_10k JSONL file the
    distillation reads; ``n_heldout`` more training-split prompts (another seed) sit at exactly the positions the
    pipeline's held-out split (``prompts.split_heldout``) draws, so it trains on the same ``n`` prompts, in order."""
    from lorasuite_core.training.prompts import split_heldout
    from lorasuite_core.training.task_data import generate_problems

    train, extra = generate_problems(n, "train", seed), generate_problems(n_heldout, "train", seed + 1000)
    train_pos, heldout_pos = split_heldout(list(range(n + n_heldout)), n_heldout, seed)
    records: list = [None] * (n + n_heldout)
    for pos, sample in [*zip(train_pos, train), *zip(heldout_pos, extra)]:
        records[pos] = {"instruction": sample.instruction, "input": sample.input}
    return _write_jsonl(path, records)


def write_seed_prompts(path: Path, k: int, seed: int) -> Path:
    """The first ``k`` training prompts (no answers): the seeds the teacher writes distillation prompts from."""
    from lorasuite_core.training.task_data import generate_problems

    return _write_jsonl(path, [{"instruction": s.instruction, "input": s.input}
                               for s in generate_problems(k, "train", seed)])


def _write_jsonl(path: Path, records: list) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.exists() or path.read_text() != text:   # unchanged files keep the stage keys' data identity
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


# ----------------------------------------------------------------------------- orchestration


def _same_settings(a: dict | None, b: dict) -> bool:
    """Settings equal apart from the command line that produced them (a resumed run may spell it differently)."""
    strip = lambda c: {k: v for k, v in c.items() if k != "command"}
    return a is None or strip(a) == strip(b)


def _read_results(pair: str) -> dict:
    path = RESULTS / f"{pair}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def sharing_pair(pair: str, config: dict) -> str | None:
    """The other pair with our old model, when its shared settings (samples, rank, seed, epochs) match ours: it may
    share stages (the old adapter and its evaluation)."""
    other = {"cross": "within", "within": "cross"}.get(pair)
    if other is None:
        return None
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

    def done(self, name: str) -> bool:
        return name in self._read().get("stages", {}) or name in self.data["stages"]

    def rebuild(self, name: str, fn, *args, recorded: dict | None = None) -> dict | None:
        """Run ``fn`` again (its recorded output is gone from the work directory) and record it as ``rebuilt_<name>``;
        a training stage notes whether it reproduced the recorded final loss."""
        if self.only is not None and name not in self.only:
            return None
        with self._locked(f".{self.pair}.{name}.lock"):
            print(f"[{self.pair}] rebuilding {name} (its output is gone) …", file=sys.stderr, flush=True)
            result = run_child(fn, *args)
            if recorded is not None and "final_loss" in recorded:
                result["reproduces_recorded_final_loss"] = result.get("final_loss") == recorded["final_loss"]
                result["recorded_final_loss"] = recorded["final_loss"]
            self.data["stages"].update(self._read().get("stages", {}))
            self.data["stages"][f"rebuilt_{name}"] = result
            self.save()
            return result

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


def _has_output(out_dir: str) -> bool:
    return (Path(out_dir) / "adapter_config.json").exists()


def pair_settings(pair: str, args) -> dict:
    """Per-pair defaults of the flags left unset: 200 test problems and 1-epoch LFT / vanilla rows on the qwen pair
    (1.5B evaluations are slow here), 500 and 2 epochs (as committed) on the others."""
    return {"test_samples": args.test_samples or (200 if pair == "qwen" else 500),
            "lft_epochs": args.lft_epochs or (1 if pair == "qwen" else 2)}


def graph_options(n_lft: int, epochs: int, seed: int, prompts: Path, seeds: Path) -> dict[str, dict]:
    """MigrationOptions of the stage-graph LFT rows: the same samples, epochs, lr (the schema's 9e-4), seed and
    held-out prompts; they differ only in where the LFT targets come from."""
    common = dict(lft_samples=n_lft, lft_epochs=epochs, seed=seed, gate_prompts=HELDOUT_PROMPTS)
    return {"labelled": dict(common, lft_mode="labelled", lft_data="builtin:train"),
            "distill": dict(common, lft_mode="distill", lft_prompts=str(prompts)),
            "distill_seed5": dict(common, lft_mode="distill", lft_seed_prompts=str(seeds))}


def run_pair(pair: str, args) -> None:
    from lorasuite_core.models.model_fetch import fetch_model

    per_pair = pair_settings(pair, args)
    config = {"pair": pair, "train_samples": args.train_samples, "test_samples": per_pair["test_samples"],
              "lft_samples": args.lft_samples, "rank": args.rank, "seed": args.seed, "epochs": args.epochs,
              "cpt_steps": args.cpt_steps if pair == "within" else None,
              "command": "python benchmarks/migration_benchmark.py " + " ".join(_argv_without_only())}
    res = Results(pair, config, only=set(args.only.split(",")) if args.only else None)
    work = Path(args.workdir) / pair
    old_name, new_name = MODELS[pair]
    old_dir = str(fetch_model(old_name))
    if pair == "within":
        new_dir = res.get("derive_new_model", stage_derive_within_model, old_dir, str(work / "derived"),
                          args.cpt_steps, args.seed)["model_dir"]
        if args.derive_only:
            return
    else:
        new_dir = str(fetch_model(new_name))
    res.data["models"] = {"old": old_dir, "new": new_dir}
    seed, n, n_test, n_lft = args.seed, args.train_samples, per_pair["test_samples"], args.lft_samples
    lft_epochs, store = per_pair["lft_epochs"], str(work / "store")
    # Both SmolLM2 pairs start from the same old model, samples and seed: one old adapter (and its evaluation).
    other = sharing_pair(pair, config)
    prefix = "old_adapter" if pair in ("cross", "within") else f"old_adapter-{old_name}"
    old_adapter, migrated = str(Path(args.workdir) / f"{prefix}-n{n}-r{args.rank}-s{seed}"), str(work / "migrated")
    old_train = (old_dir, old_adapter, n, seed, args.rank, args.epochs)

    def ensure(name: str, out_dir: str, fn, *fn_args, shared_with: str | None = None):
        """Stage ``name`` recorded or computed now; rebuilt when recorded but its output is gone."""
        result = res.get(name, fn, *fn_args, shared_with=shared_with)
        if result is not None and not _has_output(out_dir):
            res.rebuild(name, fn, *fn_args, recorded=result)
        return result

    def old_adapter_ready():
        return ensure("train_old_adapter", old_adapter, stage_train, *old_train, shared_with=other)

    def transfer_ready():
        old_adapter_ready()
        return ensure(*transfer[:1], migrated, *transfer[1:])

    def row(name: str, model: str, adapter: str | None, produce: tuple | None = None, needs=None,
            shared_with: str | None = None):
        """Row ``name``: its producing stage ``(stage, fn, *args)`` (output ``adapter``; ``needs()`` first makes
        its inputs), then its evaluation."""
        if produce is not None and not (res.done(produce[0]) and res.done(f"eval_{name}")):
            if needs is not None:
                needs()
            ensure(produce[0], adapter, *produce[1:])
        res.get(f"eval_{name}", stage_eval, model, adapter, n_test, seed + 1, args.eval_batch, shared_with=shared_with)

    prompts = write_distill_prompts(work / "prompts" / f"distill-{n_lft}.jsonl", n_lft, seed)
    seeds = write_seed_prompts(work / "prompts" / f"seeds-{SEED_PROMPTS}.jsonl", SEED_PROMPTS, seed)
    opts = graph_options(n_lft, args.graph_lft_epochs, seed, prompts, seeds)
    graph = lambda stage, out, migration, analysis=None: (stage, stage_graph_migrate, old_dir, new_dir, old_adapter,
                                                          out, store, migration, analysis or {})
    transfer = ("transfer", stage_migrate, old_dir, new_dir, old_adapter, migrated, store)
    rows = {
        "lorasuite_transfer": (new_dir, migrated, transfer),
        "lorasuite_distill_100": (new_dir, str(work / "distill-100"), graph("distill_100", str(work / "distill-100"),
                                                                             opts["distill"])),
        "old_adapter": (old_dir, old_adapter, None),
        "lorasuite_lft_100": (new_dir, str(work / "lft"),
                              graph("lft_100", str(work / "lft"), opts["labelled"]) if pair == "qwen" else
                              ("lft_100", stage_lft, new_dir, migrated, str(work / "lft"), n_lft, seed, lft_epochs)),
        "lorasuite_lft_100_graph": (new_dir, str(work / "lft-graph"),
                                    graph("lft_100_graph", str(work / "lft-graph"), opts["labelled"])),
        "vanilla_lora_100": (new_dir, str(work / "vanilla"), ("train_vanilla_100", stage_train, new_dir,
                                                              str(work / "vanilla"), n_lft, seed, args.rank, lft_epochs)),
        "new_base": (new_dir, None, None),
        "lorasuite_distill_seed5": (new_dir, str(work / "distill-seed5"),
                                    graph("distill_seed5", str(work / "distill-seed5"), opts["distill_seed5"])),
    }
    for ablation, (_, analysis) in ABLATIONS.items():
        for kind, migration in (("transfer", {}), ("distill_100", opts["distill"])):
            stage = f"ablation_{ablation}" + ("" if kind == "transfer" else f"_{kind}")
            out = str(work / stage.replace("_", "-"))
            rows[f"ablation_{ablation}_{kind}"] = (new_dir, out, graph(stage, out, migration, analysis))
    order = {  # by importance: what the targets need first
        "qwen": ("lorasuite_transfer", "lorasuite_distill_100", "old_adapter", "lorasuite_lft_100", "vanilla_lora_100",
                 "new_base", *ABLATION_ROWS, "lorasuite_distill_seed5"),
        "cross": ("lorasuite_transfer", "lorasuite_distill_100", "lorasuite_lft_100_graph",
                  *ABLATION_ROWS, "lorasuite_distill_seed5", "vanilla_lora_100", "new_base", "old_adapter"),
        "within": ("lorasuite_transfer", "lorasuite_lft_100", "vanilla_lora_100", "new_base", "old_adapter"),
    }[pair]
    if pair == "within":   # the old adapter first: the derived pair's stages as they were run
        old_adapter_ready()
    for name in order:
        model, adapter, produce = rows[name]
        if name == "old_adapter" and not res.done("eval_old_adapter"):
            old_adapter_ready()
        if produce is None or produce[1] is stage_train:
            needs = None                      # the old adapter's own row, the bare model, training on the new model
        elif produce[1] is stage_lft:
            needs = transfer_ready            # cross / within LFT: trains the transferred adapter
        else:
            needs = old_adapter_ready         # every migration: the old adapter is the source and the teacher
        row(name, model, adapter, produce, needs=needs, shared_with=other if name == "old_adapter" else None)
    if pair == "within":
        res.get("drift_diagnosis", stage_drift_diagnosis, old_dir, str(work / "derived" / "upgraded"), new_dir,
                old_adapter, migrated, str(work / "migrated-exact"), DIAGNOSIS_PROBLEMS, seed + 1)
    for s in args.distill_seeds:  # distill-100 again with another training seed: run-to-run variation
        name, out = f"lorasuite_distill_100_seed{s}", str(work / f"distill-100-seed{s}")
        row(name, new_dir, out, graph(f"distill_100_seed{s}", out, dict(opts["distill"], seed=s)), needs=old_adapter_ready)
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
        n_full = args.full_retrain_samples or n
        row("full_retrain", new_dir, str(work / "full"),
            ("train_full", stage_train, new_dir, str(work / "full"), n_full, seed, args.rank, args.epochs))


# ----------------------------------------------------------------------------- table


SHORT_ROW = re.compile(r"^(?P<base>lorasuite_lft_100|vanilla_lora_100)_(?P<epochs>\d+)ep$")
#: distill-100 repeated with another training seed (``--distill-seeds``): the run-to-run variation of training.
SEED_ROW = re.compile(r"^lorasuite_distill_100_seed(?P<seed>\d+)$")


#: Row -> the stage-graph migration that produced it (its stage name in the results).
GRAPH_STAGE = {"lorasuite_lft_100_graph": "lft_100_graph", "lorasuite_distill_100": "distill_100",
               "lorasuite_distill_seed5": "distill_seed5",
               **{f"ablation_{a}_transfer": f"ablation_{a}" for a in ABLATIONS},
               **{f"ablation_{a}_distill_100": f"ablation_{a}_distill_100" for a in ABLATIONS}}


def rows(stages: dict, pair: str | None = None) -> list[str]:
    """The pair's rows (measured or not; without a pair the base rows) and any other measured row, in
    :data:`ROW_ORDER`, each followed by its fewer-epoch variants (``--short-lft-epochs``) and, for distill-100, its
    other training seeds (``--distill-seeds``) when measured."""
    wanted = PAIR_ROWS.get(pair, BASE_ROWS + ("full_retrain",))
    fixed = [r for r in ROW_ORDER if r in wanted or f"eval_{r}" in stages]
    measured = [n[len("eval_"):] for n in stages if n.startswith("eval_")]
    short = sorted(r for r in measured if SHORT_ROW.match(r))
    seeds = sorted((r for r in measured if SEED_ROW.match(r)), key=lambda r: int(SEED_ROW.match(r)["seed"]))
    follow = lambda base: [r for r in short if SHORT_ROW.match(r)["base"] == base] + \
        (seeds if base == "lorasuite_distill_100" else [])
    return [r for base in fixed for r in [base] + follow(base)]


def graph_stage(row: str) -> str | None:
    """The stage-graph migration that produced ``row`` (its stage name in the results), if one did."""
    return GRAPH_STAGE.get(row) or (row[len("lorasuite_"):] if SEED_ROW.match(row) else None)


def lone_stage(stages: dict, name: str) -> str:
    """``name`` re-timed alone on the machine (``--retime-*``) when there is such a stage, else ``name``."""
    return f"{name}_retimed" if f"{name}_retimed" in stages else name


def row_stages(stages: dict, row: str) -> dict[str, str]:
    """Label -> stage (``name`` or ``name.field``; the field defaults to ``seconds``) of the work that produced a
    row (its evaluation aside).

    Fewer-epoch rows ran alone on the machine, so they are timed with the transfer re-timed alone. A stage-graph
    LFT row is the transfer (from an empty store) plus its own LFT step; an ablation row is its whole migration
    (the pair stages its option does not change come from the pair's store).
    """
    if (stage := graph_stage(row)) is not None:
        return {"migrate": stage} if row.startswith("ablation_") else {"transfer": "transfer", "lft": f"{stage}.lft_seconds"}
    if row == "lorasuite_lft_100" and "lft_seconds" in stages.get("lft_100", {}):    # the qwen pair: graph LFT
        return {"transfer": "transfer", "lft": "lft_100.lft_seconds"}
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


def stage_value(stages: dict, ref: str, default_field: str = "seconds"):
    """``ref`` is ``stage`` (its ``default_field``) or ``stage.field``; None when not measured."""
    name, _, field = ref.partition(".")
    return stages.get(name, {}).get(field or default_field)


def _row_stage_seconds(stages: dict, row: str) -> dict:
    return {label: stage_value(stages, ref) for label, ref in row_stages(stages, row).items()}


def _peak(stages: dict, row: str) -> float | None:
    names = [ref.partition(".")[0] for ref in row_stages(stages, row).values()] + [f"eval_{row}"]
    values = [stages[n].get("peak_rss_mb") for n in names if n in stages]
    return max(values) if values else None


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def targets(stages: dict, pair: str) -> list[str]:
    acc = lambda row: stages.get(f"eval_{row}", {}).get("accuracy")
    secs = lambda ref: stage_value(stages, ref)
    lines = []

    def check(label, ok):
        lines.append(f"- {label}: {'met' if ok else 'NOT met' if ok is not None else 'not measured'}")

    graph_epochs = stages.get("lft_100_graph", {}).get("options", {}).get("lft_epochs", 1)
    for lft in (r for r in rows(stages, pair) if r == "lorasuite_lft_100" or SHORT_ROW.match(r)
                and r.startswith("lorasuite_lft_100") or r == "lorasuite_lft_100_graph"):
        vanilla = ("vanilla_lora_100" + lft[len("lorasuite_lft_100"):] if lft != "lorasuite_lft_100_graph"
                   else f"vanilla_lora_100_{graph_epochs}ep")                  # the same number of epochs
        a, b = acc(lft), acc(vanilla)
        ea, eb = stages.get(f"eval_{lft}"), stages.get(f"eval_{vanilla}")
        check(f"LoRASuite + LFT-100 above vanilla LoRA-100 ({lft} vs {vanilla})", None if None in (a, b) else a > b)
        if ea and eb:
            lines[-1] += f" ({a:.3f} vs {b:.3f}; {_diff_text(ea, eb)})"
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
    if pair in ("cross", "qwen"):
        lines += distill_targets(stages, pair)
    return lines


def paired_counts(a: dict, b: dict) -> tuple[int, int, int, int] | None:
    """``(r, s, t, u)`` -- problems both rows solved, only ``a``, only ``b``, neither -- from their
    ``correct_mask``; None unless both rows have one, over the same number of problems."""
    ma, mb = a.get("correct_mask"), b.get("correct_mask")
    if not (isinstance(ma, str) and isinstance(mb, str) and ma and len(ma) == len(mb)):
        return None
    pairs = list(zip(ma, mb))
    return tuple(pairs.count(k) for k in (("1", "1"), ("1", "0"), ("0", "1"), ("0", "0")))  # type: ignore[return-value]


def paired_interval(r: int, s: int, t: int, u: int) -> tuple[float, float, float]:
    """``(d, low, high)`` for p1 - p2 on paired data (Newcombe 1998, paired method 10; the module docstring)."""
    from lorasuite_core.training.evaluation import wilson_interval

    n = r + s + t + u
    p1, p2 = (r + s) / n, (r + t) / n
    (l1, u1), (l2, u2) = wilson_interval(r + s, n), wilson_interval(r + t, n)
    margins = (r + s) * (t + u) * (r + t) * (s + u)
    A = r * u - s * t
    psi = 0.0 if margins == 0 else (A - n / 2) / margins ** 0.5 if A > n / 2 else A / margins ** 0.5 if A < 0 else 0.0
    d = p1 - p2
    low = d - max((p1 - l1) ** 2 - 2 * psi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0) ** 0.5
    high = d + max((p2 - l2) ** 2 - 2 * psi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0) ** 0.5
    return d, low, high


def diff_ci(a: dict, b: dict) -> tuple[float, float, float]:
    """``(d, low, high)``: accuracy difference a - b with Newcombe's 95% interval, paired where both rows say
    which problems they solved (:func:`paired_interval`), else from the two Wilson intervals as independent."""
    if (counts := paired_counts(a, b)) is not None:
        return paired_interval(*counts)
    p1, l1, u1 = a["accuracy"], a["ci_low"], a["ci_high"]
    p2, l2, u2 = b["accuracy"], b["ci_low"], b["ci_high"]
    d = p1 - p2
    return d, d - ((p1 - l1) ** 2 + (u2 - p2) ** 2) ** 0.5, d + ((u1 - p1) ** 2 + (p2 - l2) ** 2) ** 0.5


def _diff_text(a: dict, b: dict) -> str:
    d, low, high = diff_ci(a, b)
    noise = "inside the noise" if low <= 0 <= high else "outside the noise"
    return f"difference {d:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}], {noise}"


def labelled_peer(stages: dict, pair: str) -> str:
    """The labelled LFT-100 row distill-100 is held against: the stage-graph one with the same options when measured
    (cross: lorasuite_lft_100_graph; qwen: lorasuite_lft_100), else the cross pair's earlier labelled row with the
    same epochs."""
    if pair == "qwen":
        return "lorasuite_lft_100"
    epochs = stages.get("distill_100", {}).get("options", {}).get("lft_epochs", 1)
    candidates = ["lorasuite_lft_100_graph", f"lorasuite_lft_100_{epochs}ep", "lorasuite_lft_100"]
    return next((r for r in candidates if f"eval_{r}" in stages), candidates[0])


def distill_targets(stages: dict, pair: str) -> list[str]:
    """Issue targets of the distilled rows: distill-100 >= labelled LFT-100 (both pairs); on the qwen pair >= 90% of
    the old adapter on the old model and above vanilla LoRA-100 outside the CI; transfer + distill <= 10% of full
    retraining (wall time, and CPU seconds where every stage recorded them)."""
    ev = lambda row: stages.get(f"eval_{row}")
    lines = []

    def check(label, ok, detail=""):
        state = "met" if ok else "NOT met" if ok is not None else "not measured"
        lines.append(f"- {label}: {state}" + (f" ({detail})" if detail and ok is not None else ""))

    d, peer = ev("lorasuite_distill_100"), labelled_peer(stages, pair)
    p = ev(peer)
    check(f"Distill-100 without labels ≥ labelled LFT-100 (lorasuite_distill_100 vs {peer})",
          None if None in (d, p) else d["accuracy"] >= p["accuracy"],
          d and p and f"{d['accuracy']:.3f} vs {p['accuracy']:.3f}; {_diff_text(d, p)}")
    if pair == "qwen":
        o, v = ev("old_adapter"), ev("vanilla_lora_100")
        check("transfer + distill-100 ≥ 90% of the old adapter on the old model",
              None if None in (d, o) else d["accuracy"] >= 0.9 * o["accuracy"],
              d and o and o["accuracy"] and f"{d['accuracy']:.3f} = {100 * d['accuracy'] / o['accuracy']:.0f}% of "
                                            f"{o['accuracy']:.3f}")
        check("transfer + distill-100 above vanilla LoRA-100 outside the CI",
              None if None in (d, v) else diff_ci(d, v)[1] > 0,
              d and v and f"{d['accuracy']:.3f} vs {v['accuracy']:.3f}; {_diff_text(d, v)}")
    t, l, f = (stage_value(stages, r) for r in ("transfer", "distill_100.lft_seconds", "train_full"))
    n_full = stages.get("train_full", {}).get("n_samples")
    detail = None
    if None not in (t, l, f):
        detail = f"transfer {t:.0f} s + distill {l:.0f} s = {100 * (t + l) / f:.1f}% of train_full {f:.0f} s"
        cpu = [stage_value(stages, r, "cpu_seconds") for r in ("transfer", "distill_100", "train_full")]
        if None not in cpu:
            detail += (f"; CPU seconds: {cpu[0]:.0f} + {cpu[1]:.0f} = {100 * (cpu[0] + cpu[1]) / cpu[2]:.1f}% of "
                       f"{cpu[2]:.0f}")
        detail += f"; full retraining on {n_full} samples" if n_full else ""
    if f is None and (estimate := estimated_full_retraining(stages)) is not None:
        cpu_t, cpu_l = stage_value(stages, "transfer", "cpu_seconds"), stage_value(stages, "distill_100", "cpu_seconds")
        if None not in (cpu_t, cpu_l):
            ok = cpu_t + cpu_l <= 0.1 * estimate["cpu_seconds"]
            check("transfer + distill-100 time ≤ 10% of full retraining (estimated: full retraining not run)", ok,
                  f"CPU seconds: transfer {cpu_t:.0f} + distill {cpu_l:.0f} (whole stage) = "
                  f"{100 * (cpu_t + cpu_l) / estimate['cpu_seconds']:.1f}% of an estimated {estimate['cpu_seconds']:.0f} "
                  f"for {estimate['steps']} steps ({estimate['n_samples']} samples) at vanilla LoRA-100's "
                  f"{estimate['per_step']:.0f} CPU s per step on the same model")
            return lines
    check("transfer + distill-100 wall time ≤ 10% of full retraining", None if None in (t, l, f) else t + l <= 0.1 * f,
          detail)
    return lines


def estimated_full_retraining(stages: dict) -> dict | None:
    """Full retraining's CPU seconds where it was not run: vanilla LoRA-100 trains the same rank, targets and batch
    on the same new model, so its CPU seconds per optimizer step (model loading included, which overstates a
    step by well under 1% at 1.5B) times the old adapter's step count (same N, batch and epochs)."""
    vanilla, old = stages.get("train_vanilla_100", {}), stages.get("train_old_adapter", {})
    if not (vanilla.get("cpu_seconds") and vanilla.get("steps") and old.get("steps")):
        return None
    per_step = vanilla["cpu_seconds"] / vanilla["steps"]
    return {"cpu_seconds": per_step * old["steps"], "per_step": per_step, "steps": old["steps"],
            "n_samples": old.get("n_samples")}


def ablation_lines(stages: dict) -> list[str]:
    """Each ablation row against the main row it changes one option of, with the difference's 95% interval."""
    lines = []
    for ablation, (label, _) in ABLATIONS.items():
        for kind, base in (("transfer", "lorasuite_transfer"), ("distill_100", "lorasuite_distill_100")):
            row = f"ablation_{ablation}_{kind}"
            a, b = stages.get(f"eval_{row}"), stages.get(f"eval_{base}")
            head = f"- {label}, {kind.replace('_', '-')} ({row} vs {base})"
            if a is None or b is None:
                lines.append(f"{head}: not measured")
                continue
            same = ""
            mapping, reference = stages.get(GRAPH_STAGE[row], {}).get("layer_mapping"), stages.get("transfer", {}).get(
                "layer_mapping")
            if ablation == "sequential" and mapping is not None and mapping == reference:
                same = " (the same layer mapping as CKA's)"
            lines.append(f"{head}: {b['accuracy']:.3f} → {a['accuracy']:.3f}{same}; {_diff_text(a, b)}")
    return lines


def distill_lines(stages: dict) -> list[str]:
    """Per stage-graph LFT row: what the report says about its LFT (teacher agreement on held-out prompts)."""
    lines = []
    seeds = sorted(n[len("eval_"):] for n in stages if n.startswith("eval_") and SEED_ROW.match(n[len("eval_"):]))
    for row, stage in [*GRAPH_STAGE.items(), *((r, graph_stage(r)) for r in seeds)]:
        lft = stages.get(stage, {}).get("light_finetune")
        if not lft or lft.get("lft_mode") != "distill":
            continue
        lines.append(f"- {row}: {lft.get('n_prompts')} prompts ({lft.get('prompt_source')}), held-out teacher agreement "
                     f"{_fmt(lft.get('teacher_agreement_before'), 3)} → {_fmt(lft.get('teacher_agreement_after'), 3)} "
                     f"on {lft.get('n_heldout')} prompts, KL on {lft.get('kl_examples')} examples, "
                     f"{_fmt(lft.get('seconds'), 0)} s")
    return lines


def seed_lines(stages: dict) -> list[str]:
    """distill-100 against itself trained with another seed: how far one row moves from run to run of training,
    the scale the ablation differences (each one run) are to be read against."""
    base = stages.get("eval_lorasuite_distill_100")
    lines = []
    for row in rows(stages):
        if SEED_ROW.match(row) and base is not None and f"eval_{row}" in stages:
            other = stages[f"eval_{row}"]
            lines.append(f"- distill-100, training seed 0 -> {SEED_ROW.match(row)['seed']} ({row} vs lorasuite_distill_100): "
                         f"{base['accuracy']:.3f} → {other['accuracy']:.3f}; {_diff_text(other, base)}")
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
    from lorasuite_core.pipeline.graph import PAIR_STAGES

    seconds = {k: v["seconds"] for k, v in steps.items() if isinstance(v, dict) and v.get("seconds") is not None}
    pair = sum(v for k, v in seconds.items() if k in PAIR_STAGES)
    return [f"Stages of {name} (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; per model pair (cached, once per fleet) {pair:.0f}, per adapter {sum(seconds.values()) - pair:.0f}.", ""]


def table_lines(stages: dict, pair: str) -> list[str]:
    """The pair's table: every row it measures, ``not run`` (with what is already timed) where not yet evaluated."""
    out = ["| row | accuracy | 95% CI | n | train / transfer / LFT s | eval s | eval dtype | peak RSS MB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows(stages, pair):
        ev = stages.get(f"eval_{row}")
        times = ", ".join(f"{k} {v:.0f}" for k, v in _row_stage_seconds(stages, row).items() if v is not None)
        if ev is None:
            out.append(f"| {row} | not run | | | {times} | | | |")
            continue
        shared = f" (shared with {ev['shared_with']})" if ev.get("shared_with") else ""
        out.append(f"| {row}{shared} | {ev['accuracy']:.3f} | [{ev['ci_low']:.3f}, {ev['ci_high']:.3f}] | {ev['n']} | "
                   f"{times or '—'} | {ev['seconds']:.0f} | {ev.get('dtype') or 'float32 (not recorded)'} | "
                   f"{_fmt(_peak(stages, row), 0)} |")
    return out


def rebuilt_lines(stages: dict) -> list[str]:
    """Outputs a recorded stage made that were gone from the work directory and made again."""
    lines = []
    for name, result in stages.items():
        if name.startswith("rebuilt_"):
            same = result.get("reproduces_recorded_final_loss")
            check = "" if same is None else (", the recorded final loss reproduced exactly" if same else
                                             f", final loss {result.get('final_loss')} against the recorded "
                                             f"{result.get('recorded_final_loss')}")
            lines.append(f"- {name[len('rebuilt_'):]} rebuilt in {result.get('seconds', 0):.0f} s{check}")
    return lines


def markdown() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    out = ["# Migration benchmark results", "",
           f"Rendered {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (load average {load}); rows marked "
           "`not run` are still to come: the runs resume with the command of each pair.", ""]
    for pair in ("cross", "qwen", "within"):
        path = RESULTS / f"{pair}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        stages, cfg = data["stages"], data["config"]
        models = data.get("models") or dict(zip(("old", "new"), MODELS.get(pair, ("?", "?"))))
        out += [f"## {cfg['pair']}: {models['old']} → {models['new']}", ""]
        if pair == "within":
            out += ["The earlier synthetic within pair (a generated upgrade of SmolLM2-135M plus continued pre-training), "
                    "no longer in the default set: the qwen pair replaced it; its results are kept as committed.", ""]
        out += [f"Command: `{cfg['command']}`", "",
                f"N = {cfg['train_samples']} training samples, {cfg['test_samples']} test problems, "
                f"LFT / vanilla on {cfg['lft_samples']} samples, LoRA rank {cfg['rank']}, seed {cfg['seed']}.", ""]
        if data.get("notes"):
            out += [f"Conditions: {data['notes']}", ""]
        if "derive_new_model" in stages:
            d = stages["derive_new_model"]
            out += [f"New model: upgrade generator + continued pre-training on {d['corpus']} "
                    f"({d['corpus_tokens']} tokens in the corpus, {d['cpt_tokens_seen']} tokens seen in {d['cpt_steps']} steps, "
                    f"lr {d['cpt_lr']}, loss {_fmt(d['cpt_first_loss'], 3)} → {_fmt(d['cpt_last_loss'], 3)}).", ""]
        out += table_lines(stages, pair)
        missing = [r for r in rows(stages, pair) if f"eval_{r}" not in stages]
        if missing:
            out += ["", f"Still missing (not yet run): {', '.join(missing)}."]
        out += ["", "Targets (95% intervals of differences, paired on the same test problems, cover the choice of test "
                    "problems only: every row is one training run with seed 0, so run-to-run variation of training is "
                    "not in them):"] + targets(stages, cfg["pair"]) + [""]
        if pair in ("cross", "qwen"):
            out += ["Ablations (one analysis option changed; Newcombe 95% interval of the accuracy difference, paired on the "
                    "same test problems):"]
            out += ablation_lines(stages) + [""]
        if seed_lines(stages):
            out += ["Run-to-run variation of training (the same row, another seed: its shuffling, held-out split and "
                    "initialisation of new modules; read the ablation differences against it):"] + seed_lines(stages) + [""]
        if distill_lines(stages):
            out += ["Distillation (the report's light_finetune):"] + distill_lines(stages) + [""]
        if rebuilt_lines(stages):
            out += ["Rebuilt outputs:"] + rebuilt_lines(stages) + [""]
        if "drift_diagnosis" in stages:
            out += diagnosis_lines(stages["drift_diagnosis"])
        for name in ("transfer", "transfer_retimed"):
            if name in stages:
                out += transfer_stage_lines(name, stages[name]["steps"])
    return "\n".join(out)


def _positive_ints(what: str):
    """An argparse type: comma-separated integers >= 1 (``what`` names them in the error)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(e) for e in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values
    return parse


_seed_list = _positive_ints("training seeds >= 1 (0 is the main row)")
_epoch_list = _positive_ints("epoch counts >= 1")


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=["cross", "qwen", "within", "both"], default="both",
                   help="both: cross, then qwen (within: the earlier synthetic pair)")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=None, help="default 200 on the qwen pair, else 500")
    p.add_argument("--lft-samples", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lft-epochs", type=int, default=None,
                   help="epochs of the lft_100 / vanilla_lora_100 rows; default 2 on cross / within (as committed; "
                        "`lorasuite migrate` defaults to 1, which --short-lft-epochs 1 measures), 1 on qwen")
    p.add_argument("--graph-lft-epochs", type=int, default=1,
                   help="epochs of the stage-graph LFT rows (distill, qwen's lft_100, lft_100_graph, ablations)")
    p.add_argument("--full-retrain-samples", type=int, default=None,
                   help="samples of the full-retraining row (default --train-samples; fewer where N does not fit)")
    p.add_argument("--retime-full-retrain", action="store_true",
                   help="train the full-retraining adapter once more on its own, for a like-for-like wall-time ratio")
    p.add_argument("--short-lft-epochs", type=_epoch_list, default=[],
                   help="also run LFT and vanilla LoRA with these (fewer) epochs, e.g. 1: rows lorasuite_lft_100_<E>ep and "
                        "vanilla_lora_100_<E>ep, timed against the lone transfer and full retraining when re-timed "
                        "(run them alone on the machine)")
    p.add_argument("--distill-seeds", type=_seed_list, default=[],
                   help="also run distill-100 with these training seeds, e.g. 1: rows lorasuite_distill_100_seed<S> "
                        "(the run-to-run variation the single-run rows and ablations are read against)")
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
        for pair in (["cross", "qwen"] if args.pair == "both" else [args.pair]):
            run_pair(pair, args)
    text = markdown()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "RESULTS.md" if RESULTS == ROOT / "benchmarks" / "results" else RESULTS / "RESULTS.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
