"""A fleet of real skills migrated across a base-model upgrade, against what a user would do instead (issue 20).

Pairs: ``cross`` SmolLM2-135M-Instruct -> Gemma-3-270M (run here); ``shape`` SmolLM2-135M-Instruct -> the same model
after continued pre-training on Shakespeare (``same_shape_model.py``: an implicit, same-shape upgrade; derived on
first use); ``qwen`` Qwen2.5-Coder-0.5B -> 1.5B (``--pair qwen``; too slow for this 2-core CPU at 3 seeds).  Skills: the registry's (``task:NAME:SPLIT[:COUNT]``), each
with its old-adapter recipe in :data:`SKILLS` (N samples, epochs, learning rate); chain_sum joined after the first four
(``SKILL_SELECTION_SMOLLM2_MORE.md``: letter_counting's old adapter is no better than the bare model).

Rows per skill (test: ``task:NAME:test:T`` at seed 0 for every row; LoRA rank 16, alpha 32, q k v o gate up down):

  bare_old        the old model alone (the skill-selection check: the old adapter must beat it clearly)
  old_adapter     the old adapter on the old model; trained with ``lorasuite train`` on ``task:NAME:train:N``
  bare_new        the new model alone
  transfer        transfer only: ONE ``lorasuite migrate-fleet`` run migrates every skill's old adapter
                  (one pair analysis; fidelity off)
  copy            same-shape pairs only: ``--route copy`` through the stage graph, the old adapter as is.  This is
                  also the ParamDelta row: ParamDelta carries a fine-tune to a new base as W_new + (W_old' - W_old),
                  and for a LoRA adapter W_old' - W_old is the adapter's own delta s·BA, so ParamDelta's model is
                  W_new + s·BA -- the copied adapter on the new base, the same function (merged or not)
  distill         transfer + distill-100 through the stage graph (``migrate_in_process``, the fleet's store, so
                  the pair analysis and the transfer are reused): ``lft_mode: distill``, prompts
                  ``task:NAME:train:100+H`` without answers, H = 16 of them held out for teacher agreement
  fresh_distill   a fresh LoRA (PEFT init: A random, B = 0; the source adapter's rank, alpha and targets) on the
                  new model + the same distillation (same prompts and held-out split, teacher, KL weight, learning
                  rate, epochs and seed): the library calls of the pipeline's distill stage
                  (``prompts.load_prompts``, ``prompts.split_heldout``, ``distill.distill``) with the fresh adapter
  gkd             the distill row with ``lft_on_policy: 0.5`` (GKD: half of
                  the training batches on answers the student samples itself, the teacher's token distributions
                  on them as the target; ``lorasuite_core.training.on_policy``)
  seq             the distill row with ``lft_kl_weight: 0``: the teacher's greedy answers are the only target
                  (sequence-level distillation), no token-level KL -- the KL's share of the distill row (over the
                  full vocabulary where the vocabularies coincide, the shared-token map across families)
  synth           the distill row on prompts the old base model writes from SYNTH_SEEDS = 5 seed prompts
                  (``lft_seed_prompts: task:NAME:train:5``, no ``lft_prompts``; the 16 held-out prompts are
                  synthesised too): a user who has a handful of the adapter's prompts instead of a hundred
  lft             transfer + labelled LFT on ``task:NAME:train:100`` (the stage graph)
  auto            ``--route auto`` with the distill row's options (seed 0; fidelity on, as auto needs): the stage
                  graph tries copy (same shapes only), transfer, distill and fresh-distill, scores each on the
                  held-out prompts' teacher agreement and fidelity and publishes the best that clears the gate; the
                  row is the published adapter, with the route's choice and every candidate's numbers recorded
  vanilla         a fresh LoRA on the new model on the 100 labelled samples (1 epoch, as the pipeline's vanilla
                  baseline) at the better of lr 3e-4 / 9e-4, chosen on ``task:NAME:validation:V`` with seed 0
  full            ``lorasuite train`` on the new model with the old adapter's recipe (N samples)

Seeds: distill, fresh_distill, vanilla, gkd, seq and synth at seeds 0, 1, 2 (the options' ``seed``: for a ``task:`` spec it also
draws the 100 samples/prompts, so a seed varies the data as well as the initialisation and order); the rest seed 0.

Intervals: one seed -- Wilson over the test problems; several seeds -- a bootstrap over seeds x problems (2000
resamples of the seeds and, independently, of the problems: the mean over the resampled grid, 2.5/97.5
percentiles).  A difference of two rows resamples the problems jointly (paired) and the seeds of each row (paired
by seed where both rows have the same seeds); the pooled paired Newcombe interval (every seed's problems pooled,
``migration_benchmark.paired_interval``) is given next to it.

Generation dtype: the rows that distil or pick a route generate (the teacher's answers, held-out answers) in the
pipeline's ``generation_dtype`` default, float32 (``GENERATION_DTYPE.md`` compares bf16 on the distill row);
evaluation runs in its own default, bf16 here.

Cost: every stage runs in its own process (``run_child`` or a CLI subprocess under ``/usr/bin/time -v``): wall and
CPU seconds, the load average, and for training the compute dtype (bf16 autocast where the CPU has bf16 matmul).
Results are merged into ``benchmarks/results/skill_fleet_<pair>.json`` after every stage; a rerun resumes (recorded
stages are skipped; their adapters live in ``--workdir``).  Order: every skill's old adapter, bare and transfer
rows, then distill / fresh_distill / vanilla at seed 0, then lft, then seeds 1 and 2, then auto, then full
retraining, then gkd (seeds 0, 1, 2). ``--seeds``, ``--rows`` and ``--no-auto`` narrow a run so that a second process
(its own ``--results``, merged with ``--merge-from``) can take the other seeds or rows.  The recipe ablations seq and
synth run only when ``--rows`` names them (with the seeded rows, at each seed).

Old adapters: ``--reuse-old PAIR`` takes them from another pair of the same old model (its work directory under
``--workdir`` and its results JSON: the adapters are copied, their records kept with ``reused_from``), since the
old model, recipe and seed are the same and CPU training here is deterministic (retrained adapters reproduced the
recorded final loss to the last digit).

Two processes (one per core) may share a pair's work by skills: stop the run, copy its results JSON, restart it on
some skills and a second process on the others with ``--results COPY``; afterwards ``--merge-from COPY`` adds the
second's stages to the first's file.

Usage
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/skill_fleet.py --pair cross &
  LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/skill_fleet.py --pair shape --reuse-old cross &
  .venv/bin/python benchmarks/skill_fleet.py --pair cross --markdown       # benchmarks/SKILL_FLEET.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import loadavg, merge_json, parse_time_v, run_rss_traced  # noqa: E402
from migration_benchmark import run_child, stage_graph_migrate  # noqa: E402
from skill_fleet_stages import (ALPHA, RANK, stage_auto, stage_eval, stage_fresh_distill,  # noqa: E402,F401
                                stage_vanilla)

PAIRS = {"cross": ("smollm2-135m-instruct", "gemma3-270m"),
         "shape": ("smollm2-135m-instruct", "smollm2-135m-instruct-cpt-shakespeare"),
         "qwen": ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")}
#: Pairs whose models share architecture, shapes and tokenizer: they get the copy (= ParamDelta) row.
SAME_SHAPE = {"shape"}
#: The skills the old SmolLM2 adapters learn (letter_counting's is no better than the bare model).
LEARNT = ["arithmetic", "family_relationships", "knowledge", "chain_sum"]
#: skill -> old adapter recipe (N samples, epochs, lr) and test problems
SKILLS = {"arithmetic": {"n": 300, "epochs": 2, "lr": 3e-4, "test": 100},
          "letter_counting": {"n": 300, "epochs": 2, "lr": 3e-4, "test": 100},
          "family_relationships": {"n": 300, "epochs": 2, "lr": 3e-4, "test": 100},
          "knowledge": {"n": 600, "epochs": 3, "lr": 1e-3, "test": 100},
          "chain_sum": {"n": 300, "epochs": 2, "lr": 3e-4, "test": 100},
          "bfcl": {"n": 340, "epochs": 1, "lr": 3e-4, "test": 100}}
N_100, HELD, VALIDATION, TEST_SEED = 100, 16, 50, 0
VANILLA_LRS = (3e-4, 9e-4)
SEEDS = (0, 1, 2)
SEEDED_ROWS = ("distill", "fresh_distill", "vanilla")   # the rows run at every seed
#: Recipe ablations of the distill row, run only when ``--rows`` names them.
EXTRA_ROWS = ("seq", "synth")
MULTI_SEED = ("distill", "fresh_distill", "vanilla", "gkd", *EXTRA_ROWS)
ROWS = ("bare_old", "old_adapter", "bare_new", "transfer", "copy", "distill", "gkd", *EXTRA_ROWS, "fresh_distill",
        "lft", "vanilla", "auto", "full")
#: The synth row's seed prompts (drawn from the skill's training split at the row's seed).
SYNTH_SEEDS = 5
#: Pairs with the gkd row (on-policy distillation runs wherever the token-level KL does: identical vocabularies or,
#: across families, the shared-token map; measured so far on the same-shape pair only).
GKD_PAIRS = {"shape", "qwen", "cross"}
#: The gkd row's share of on-policy batches (``--lft-on-policy``).
GKD_SHARE = 0.5


def results_path(pair: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"skill_fleet_{pair}.json"


def run_cli(args: list[str], threads: int, *, rss_trace: bool = False) -> dict:
    """``lorasuite ARGS`` in a subprocess under ``/usr/bin/time -v``: its wall/CPU seconds and peak RSS (and with
    ``rss_trace``, its RSS every second and at each stage line: ``_common.run_rss_traced``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = loadavg()
    cmd, extra = [sys.executable, "-m", "flows.cli", *args], {}
    if rss_trace:
        extra["rss_every_s"] = 1.0
        returncode, stdout, stderr, extra["rss_trace"] = run_rss_traced(cmd, env=env, cwd=ROOT, every_s=1.0)
    else:
        done = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    if returncode != 0:
        raise RuntimeError(f"lorasuite {shlex.join(args)} failed ({returncode}):\n{stderr[-3000:]}")
    timing = parse_time_v(stderr)
    return {**timing, "cpu_seconds": timing["user_s"] + timing["system_s"], "seconds": timing["wall_s"],
            "command": "lorasuite " + shlex.join(args), "loadavg_start": load, "loadavg_end": loadavg(),
            "stdout_tail": stdout[-1500:], **extra}


def machine(threads: int) -> dict:
    import torch

    from lorasuite_core.training.devices import cpu_supports_bf16, training_compute_dtype

    torch.set_num_threads(threads)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates[str(dtype).replace("torch.", "")] = round(5 * 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9, 1)
    return {"cpu": name, "cpus": os.cpu_count(), "threads": threads, "bf16_matmul": cpu_supports_bf16(),
            "training_compute_dtype": training_compute_dtype(), "gemm_1024_gflops": rates,
            "torch": torch.__version__, "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ----------------------------------------------------------------------------- the run


def derived_or_fetched(name: str) -> Path:
    import same_shape_model

    from lorasuite_core.models.model_fetch import fetch_model

    return same_shape_model.ensure() if name == same_shape_model.NAME else fetch_model(name)


def same_tensors(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


class Run:
    def __init__(self, args):
        self.args, self.path = args, Path(args.results or results_path(args.pair))
        names = (args.old_model or PAIRS[args.pair][0], args.new_model or PAIRS[args.pair][1])
        self.old, self.new = (name if Path(name).is_dir() else str(derived_or_fetched(name)) for name in names)
        self.work = Path(args.workdir) / args.pair
        self.store = str(self.work / "store")
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.stages: dict = data.get("stages", {})

    def record(self, name: str, fn, *fn_args) -> dict:
        if name in self.stages:
            return self.stages[name]
        print(f"[skill-fleet] {name} ...", flush=True)
        result = fn(*fn_args) if fn in (run_cli,) else run_child(fn, *fn_args)
        self.stages[name] = result
        merge_json(self.path, {"stages": self.stages})
        summary = {k: result[k] for k in ("accuracy", "seconds", "cpu_seconds", "final_loss") if k in result}
        print(f"[skill-fleet] {name}: {summary}", flush=True)
        return result

    def adapter(self, skill: str, row: str, seed: int = 0) -> str:
        return str(self.work / "adapters" / skill / f"{row}-s{seed}")

    def test(self, skill: str) -> str:
        return f"task:{skill}:test:{SKILLS[skill]['test']}"

    def evaluate(self, skill: str, row: str, model: str, adapter: str | None, seed: int = 0) -> dict:
        return self.record(f"{skill}/eval/{row}/s{seed}", stage_eval, model, adapter, self.test(skill), TEST_SEED)

    def train_cli(self, skill: str, row: str, model: str) -> str:
        recipe, out = SKILLS[skill], self.adapter(skill, row)
        key = f"{skill}/train/{row}/s0"
        if key in self.stages and not (Path(out) / "adapter_model.safetensors").is_file():   # a fresh work directory:
            self.stages[f"{key}/replaced"] = self.stages.pop(key)                         # train again, keep the record
        self.record(key, run_cli,
                    ["train", "--model", model, "--data", f"task:{skill}:train:{recipe['n']}", "--output", out,
                     "--overwrite", "--epochs", str(recipe["epochs"]), "--lr", str(recipe["lr"]), "--rank", str(RANK),
                     "--alpha", str(ALPHA), "--seed", "0"], self.args.threads)
        summary = Path(out) / "training_summary.json"
        if summary.is_file() and "training" not in self.stages[key]:
            written = json.loads(summary.read_text())
            self.stages[key]["training"] = {k: v for k, v in written.get("result", {}).items() if k != "losses"}
            self.stages[key]["train_config"] = written.get("config")
            merge_json(self.path, {"stages": self.stages})
        return out

    def reuse_old(self, pair: str) -> None:
        """The old adapters and their records from ``pair`` (same old model): see the module docstring."""
        import shutil

        if PAIRS[pair][0] != PAIRS[self.args.pair][0]:
            raise SystemExit(f"--reuse-old {pair}: its old model is {PAIRS[pair][0]}, not {PAIRS[self.args.pair][0]}")
        theirs = json.loads(results_path(pair).read_text())["stages"]
        for skill in self.args.skills:
            source = Path(self.args.workdir) / pair / "adapters" / skill / "old_adapter-s0"
            target = Path(self.adapter(skill, "old_adapter"))
            if not (target / "adapter_model.safetensors").is_file():
                if not (source / "adapter_model.safetensors").is_file():
                    raise SystemExit(f"--reuse-old {pair}: no old adapter at {source}")
                shutil.copytree(source, target, dirs_exist_ok=True)
            for key in (f"{skill}/train/old_adapter/s0", f"{skill}/eval/old_adapter/s0", f"{skill}/eval/bare_old/s0"):
                if key not in self.stages and key in theirs:
                    self.stages[key] = {**theirs[key], "reused_from": results_path(pair).name}
        merge_json(self.path, {"stages": self.stages})

    def copy(self, skill: str) -> None:
        """``--route copy`` (= ParamDelta for a LoRA adapter: module docstring); records that the published tensors
        are the old adapter's."""
        out, old = self.adapter(skill, "copy"), self.adapter(skill, "old_adapter")
        key = f"{skill}/train/copy/s0"
        done = self.record(key, stage_graph_migrate, self.old, self.new, old, out, self.store,
                           {"route": "copy", "fidelity": False}, {})
        if "same_tensors_as_old_adapter" not in done:
            done["same_tensors_as_old_adapter"] = same_tensors(out, old)
            merge_json(self.path, {"stages": self.stages})
        self.evaluate(skill, "copy", self.new, out)

    def fleet(self) -> None:
        """One ``migrate-fleet`` run for the skills; a skill added after it (no transfer row yet) gets a second run
        of its own, ``fleet/migrate/+SKILL..`` (the same pair: its analysis is reused where the store still holds it)."""
        skills = self.args.skills
        name = "fleet/migrate"
        if name in self.stages:
            skills = [s for s in skills if f"{s}/eval/transfer/s0" not in self.stages]
            name = "fleet/migrate/+" + "+".join(skills)
            if not skills or name in self.stages:
                return
        manifest = self.work / ("fleet.json" if name == "fleet/migrate" else f"fleet-{'+'.join(skills)}.json")
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({
            "old_model": self.old, "new_model": self.new, "output_root": str(self.work / "transfer"),
            "defaults": {"fidelity": False},
            "adapters": [{"name": s, "adapter": self.adapter(s, "old_adapter")} for s in skills]}, indent=2))
        self.record(name, run_cli, ["migrate-fleet", "--manifest", str(manifest), "--cache-root", self.store],
                    self.args.threads)

    def distill_options(self, skill: str, seed: int) -> dict:
        return {"lft_mode": "distill", "lft_prompts": f"task:{skill}:train:{N_100 + HELD}", "lft_samples": N_100,
                "gate_prompts": HELD, "seed": seed, "fidelity": False}

    def distill(self, skill: str, seed: int) -> None:
        out = self.adapter(skill, "distill", seed)
        self.record(f"{skill}/train/distill/s{seed}", stage_graph_migrate, self.old, self.new,
                    self.adapter(skill, "old_adapter"), out, self.store, self.distill_options(skill, seed), {})
        self.evaluate(skill, "distill", self.new, out, seed)

    def gkd(self, skill: str, seed: int) -> None:
        """transfer + distill-100 with a share of on-policy batches (GKD), everything else as the distill row."""
        out = self.adapter(skill, "gkd", seed)
        self.record(f"{skill}/train/gkd/s{seed}", stage_graph_migrate, self.old, self.new,
                    self.adapter(skill, "old_adapter"), out, self.store,
                    {**self.distill_options(skill, seed), "lft_on_policy": GKD_SHARE}, {})
        self.evaluate(skill, "gkd", self.new, out, seed)

    def seq(self, skill: str, seed: int) -> None:
        """The distill row without the token-level KL (``lft_kl_weight: 0``): the teacher's answers only."""
        out = self.adapter(skill, "seq", seed)
        self.record(f"{skill}/train/seq/s{seed}", stage_graph_migrate, self.old, self.new,
                    self.adapter(skill, "old_adapter"), out, self.store,
                    {**self.distill_options(skill, seed), "lft_kl_weight": 0.0}, {})
        self.evaluate(skill, "seq", self.new, out, seed)

    def synth(self, skill: str, seed: int) -> None:
        """The distill row on prompts synthesised from SYNTH_SEEDS of the skill's training prompts."""
        out = self.adapter(skill, "synth", seed)
        options = {**self.distill_options(skill, seed), "lft_prompts": None,
                   "lft_seed_prompts": f"task:{skill}:train:{SYNTH_SEEDS}"}
        self.record(f"{skill}/train/synth/s{seed}", stage_graph_migrate, self.old, self.new,
                    self.adapter(skill, "old_adapter"), out, self.store, options, {})
        self.evaluate(skill, "synth", self.new, out, seed)

    def fresh_distill(self, skill: str, seed: int) -> None:
        out = self.adapter(skill, "fresh_distill", seed)
        self.record(f"{skill}/train/fresh_distill/s{seed}", stage_fresh_distill, self.old,
                    self.adapter(skill, "old_adapter"), self.new, out, self.distill_options(skill, seed))
        self.evaluate(skill, "fresh_distill", self.new, out, seed)

    def lft(self, skill: str) -> None:
        out = self.adapter(skill, "lft")
        self.record(f"{skill}/train/lft/s0", stage_graph_migrate, self.old, self.new, self.adapter(skill, "old_adapter"),
                    out, self.store, {"lft_data": f"task:{skill}:train:{N_100}", "lft_samples": N_100,
                                      "fidelity": False}, {})
        self.evaluate(skill, "lft", self.new, out)

    def auto(self, skill: str) -> None:
        out = self.adapter(skill, "auto")
        done = self.record(f"{skill}/train/auto/s0", stage_auto, self.old, self.new, self.adapter(skill, "old_adapter"),
                           out, self.store, {**self.distill_options(skill, 0), "route": "auto", "fidelity": True})
        if "refused" not in done:
            self.evaluate(skill, "auto", self.new, out)

    def vanilla_lr(self, skill: str) -> float:
        """Both learning rates at seed 0, scored on the validation split; the better one (ties: the lower)."""
        scores = {}
        for lr in VANILLA_LRS:
            out = self.adapter(skill, f"vanilla-lr{lr:g}")
            self.record(f"{skill}/train/vanilla-lr{lr:g}/s0", stage_vanilla, self.new, f"task:{skill}:train:{N_100}",
                        out, lr, 0)
            spec = f"task:{skill}:validation:{VALIDATION}"
            scores[lr] = self.record(f"{skill}/validation/vanilla-lr{lr:g}/s0", stage_eval, self.new, out, spec,
                                     TEST_SEED)["accuracy"]
        return max(VANILLA_LRS, key=lambda lr: (scores[lr], -lr))

    def vanilla(self, skill: str, seed: int) -> None:
        lr = self.vanilla_lr(skill)
        out = self.adapter(skill, f"vanilla-lr{lr:g}", seed)
        if seed:
            self.record(f"{skill}/train/vanilla-lr{lr:g}/s{seed}", stage_vanilla, self.new,
                        f"task:{skill}:train:{N_100}", out, lr, seed)
        self.evaluate(skill, "vanilla", self.new, out, seed)

    def run(self) -> None:
        skills = self.args.skills
        before = json.loads(self.path.read_text()) if self.path.is_file() else {}
        commands = before.get("commands", [before["command"]] if "command" in before else [])
        merge_json(self.path, {"command": self.args.command,
                               "commands": list(dict.fromkeys([*commands, self.args.command])), "pair": self.args.pair,
                               "models": [self.args.old_model or PAIRS[self.args.pair][0],
                                          self.args.new_model or PAIRS[self.args.pair][1]],
                               "skills": {**before.get("skills", {}), **{s: SKILLS[s] for s in skills}},
                               "settings": {"n_100": N_100, "held_out": HELD, "validation": VALIDATION,
                                            "test_seed": TEST_SEED, "vanilla_lrs": VANILLA_LRS, "seeds": SEEDS,
                                            "rank": RANK, "alpha": ALPHA}})
        if "machine" not in before:
            merge_json(self.path, {"machine": run_child(machine, self.args.threads)})
        else:                    # a resumed run: this machine too (a fresh work directory retrains the old adapters)
            merge_json(self.path, {"resumed_on": [*before.get("resumed_on", []), run_child(machine, self.args.threads)]})
        if self.args.reuse_old:
            self.reuse_old(self.args.reuse_old)
        for skill in skills:
            self.train_cli(skill, "old_adapter", self.old)
            self.evaluate(skill, "old_adapter", self.old, self.adapter(skill, "old_adapter"))
            self.evaluate(skill, "bare_old", self.old, None)
            self.evaluate(skill, "bare_new", self.new, None)
        self.fleet()
        for skill in skills:
            self.evaluate(skill, "transfer", self.new, str(self.work / "transfer" / skill))
            if self.args.pair in SAME_SHAPE:
                self.copy(skill)
        for seed in self.args.seeds:
            for skill in skills:
                for row in self.args.rows:
                    getattr(self, row)(skill, seed)
            if seed == 0:
                for skill in skills:
                    self.lft(skill)
        if not self.args.no_auto:
            for skill in skills:
                self.auto(skill)
        if not self.args.no_full:
            for skill in skills:
                self.evaluate(skill, "full", self.new, self.train_cli(skill, "full", self.new))
        if self.args.pair in GKD_PAIRS and not self.args.no_gkd:
            for seed in self.args.seeds:
                for skill in skills:
                    self.gkd(skill, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="cross")
    parser.add_argument("--skills", nargs="+", choices=sorted(SKILLS),
                        help="default: the cross pair's five (letter_counting included, as first run), else the four "
                             "the old SmolLM2 adapters learn")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "skill-fleet"))
    parser.add_argument("--no-full", action="store_true", help="skip the full-retraining rows")
    parser.add_argument("--no-gkd", action="store_true", help="skip the on-policy (gkd) rows")
    parser.add_argument("--no-auto", action="store_true", help="skip the --route auto rows (a later run adds them)")
    parser.add_argument("--rows", nargs="+", choices=SEEDED_ROWS + EXTRA_ROWS, default=list(SEEDED_ROWS),
                        help="the seeded rows to run (default: distill, fresh_distill, vanilla; the recipe ablations "
                             "seq and synth only when named)")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, default=list(SEEDS),
                        help="run the seeded rows (those of --rows; gkd) at these seeds only: a "
                             "second process can take some (default: all)")
    parser.add_argument("--reuse-old", choices=sorted(PAIRS), help="take the old adapters from this pair's run")
    parser.add_argument("--old-model", help="a model directory in place of the pair's old model (a smoke run)")
    parser.add_argument("--new-model", help="a model directory in place of the pair's new model")
    parser.add_argument("--results", help="results JSON in place of benchmarks/results/skill_fleet_<pair>.json")
    parser.add_argument("--markdown", action="store_true", help="render benchmarks/SKILL_FLEET[_PAIR].md (from --results when given) and stop")
    parser.add_argument("--merge-from", metavar="JSON", help="add the stages of another run's results file (a second "
                        "process on other skills, started from a copy of this one) that this one lacks, and stop")
    args = parser.parse_args()
    if args.skills is None:
        args.skills = (["arithmetic", "family_relationships", "letter_counting", "knowledge", "chain_sum"]
                       if args.pair == "cross" else LEARNT)
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    args.command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/skill_fleet.py "
                    + shlex.join(sys.argv[1:]))
    if args.merge_from:
        path = Path(args.results or results_path(args.pair))
        mine, theirs = (json.loads(Path(p).read_text()) for p in (path, args.merge_from))
        label = Path(args.merge_from).name
        added = {k: v for k, v in theirs["stages"].items() if k not in mine["stages"]}
        # a stage both ran (each process's own migrate-fleet run) is kept twice: theirs under KEY@FILE
        added |= {f"{k}@{label}": v for k, v in theirs["stages"].items()
                  if k in mine["stages"] and v != mine["stages"][k]}
        merged = {**mine.get("merged_from", {}), label: {"skills": list(theirs["skills"]),
                                                         "commands": theirs.get("commands", [])}}
        merge_json(path, {"stages": {**mine["stages"], **added}, "skills": {**mine["skills"], **theirs["skills"]},
                          "commands": list(dict.fromkeys([*mine.get("commands", []), *theirs.get("commands", [])])),
                          "merged_from": merged})
        print(f"merged {len(added)} stages from {args.merge_from} into {path}")
        return
    if args.markdown:
        from skill_fleet_report import write_markdown

        print(write_markdown(args.pair, args.results))
        return
    Run(args).run()


if __name__ == "__main__":
    main()
