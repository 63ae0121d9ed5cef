"""Every LoRA module carried by maps fitted on that module's own paired activations (issue 22, item 2: the unit
side on activations) -- a probe: does fitting both sides of each module on activations carry the adapter's function
where the residual-side activation fit (``--transfer-fit activations``) does not?

Math. For a mapped layer pair (old i -> new j) and a LoRA module m of that layer (q, k, v, o, gate, up, down) with
old factors B (out_o × r), A (r × in_o), both models read the same calibration texts; at the paired positions
(both tokenisations end a token at the same character, ``transfer/activations.py``) hooks keep each module's
input, x_o (in_o) and x_n (in_n): the normed residual for q/k/v and gate/up, the heads' concatenated outputs for o,
act(gate)·up for down.  The module's base output is y = W x.  Two ridge fits per module (float64, the ridge of
each chosen on held-out rows: ``activation_fit.choose_ridge``; only the products with the adapter's factors are
formed, below):

    input map   T (in_o × in_n) = argmin ‖X_n Tᵀ − X_o‖² + λ‖T‖²        x_o ≈ T x_n
    output map  S (out_n × out_o) = argmin ‖Y_o Sᵀ − Y_n‖² + λ‖S‖²      y_n ≈ S y_o

and the delta goes through both, in factor form (no out × in matrix):  A_new = A T,  B_new = S B.  A T is the
ridge of the adapter's input features X_o Aᵀ (n × r) on X_n, column by column the same as forming T (ρ chosen on
those features; q/k/v, gate/up, which read one input, in one fit); S B = Y_nᵀ Y_o (Y_oᵀY_o + λI)⁻¹ B (ρ chosen
on 64 random projections of Y_n, whose held-out error estimates the whole one).  So on the
calibration rows ΔW_new x_n = S B A T x_n ≈ S (ΔW_old x_o): the old module's change, read from what the old module
would have read and written in the new module's output coordinates.  Unlike the pipeline's maps, S and T are dense
over the whole module: no head or neuron matching (a head's dimensions may draw on every old head).  Several old
layers on one new layer (a shallower new model) put their factors side by side (rank r per old layer); the
published adapter has rank r · (most old layers on one new layer) everywhere, zero-padded, alpha scaled to keep
α / r, so no re-factorisation loses anything.  Under a function-preserving upgrade x_n = M x_o and y_n = N y_o
with M, N invertible on the spans, so with enough distinct rows T = M⁺, S = N and the carry is exact; on a real
pair the fits' R² says how much of each side the other model's activations predict.

Calibration: the skill's first ``--prompts`` training prompts (``task:SKILL:train``, no labels) in the built-in
template, each followed by the teacher's greedy answer (old model + old adapter), so that the rows are the
positions the adapter acts on; every distinct prefix once (texts sharing a template repeat the same states), at
most ``--rows`` rows.

Scored with the pipeline's own fidelity (``training/fidelity.py``) on the 16 held-out test prompts and teacher
answers that ``transfer_fit.py``'s ``activations`` fleet kept in its fidelity entry, next to that fleet's weights
and activations adapters; accuracy on the skill's 100 test problems with ``--accuracy``.

Usage (after transfer_fit.py on the cross pair; one thread, niced)::

    LORASUITE_BENCH_THREADS=1 nice -n 19 .venv/bin/python benchmarks/module_fit_probe.py \\
        --workdir /work/wt/skills/runs/skill-fleet/cross --skills arithmetic family_relationships knowledge chain_sum
    .venv/bin/python benchmarks/module_fit_probe.py --markdown        # benchmarks/MODULE_FIT.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from _common import cpu_model, gemm_gflops, loadavg, merge_json  # noqa: E402
from skill_fleet import PAIRS, derived_or_fetched  # noqa: E402

RESULTS = RESULTS_DEFAULT = ROOT / "benchmarks" / "results" / "module_fit_cross.json"
ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}
KEY = re.compile(r"layers\.(\d+)\.(.+?)\.(\w+_proj)\.lora_([AB])\.weight$")


def model_dir(name: str) -> str:
    """The fetched model's directory, where the skill fleet finds it (``lorasuite models fetch``)."""
    return str(derived_or_fetched(name))


# ----------------------------------------------------------------------------- calibration rows

def calibration_texts(old_dir: str, adapter_dir: str, skill: str, count: int) -> list[str]:
    """The skill's first ``count`` training prompts in the built-in template + the teacher's greedy answers."""
    from lorasuite_core.training import prompts as P
    from lorasuite_core.training.completions import greedy_completions
    from lorasuite_core.training.evaluation import load_for_generation

    prompts = P.load_prompts(f"task:{skill}:train", count, 0)
    model, tokenizer = load_for_generation(old_dir, adapter_dir, dtype="float32", device="cpu")
    answers = greedy_completions(model, tokenizer, prompts)
    return [p.formatted() + a.text for p, a in zip(prompts, answers, strict=True)]


def paired_rows(old_tok, new_tok, texts: list[str], rows: int) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Per text: (old ids, old positions, new ids, new positions), the positions at character ends both
    tokenisations share, each distinct prefix once, until ``rows`` rows."""
    from lorasuite_core.transfer.activations import _token_ends

    seen, out, total = set(), [], 0
    for t, text in enumerate(texts):
        old_ids, old_ends = _token_ends(old_tok, text, 512)
        new_ids, new_ends = _token_ends(new_tok, text, 512)
        ends = [c for c in sorted(set(old_ends) & set(new_ends)) if text[:c] not in seen][: rows - total]
        seen.update(text[:c] for c in ends)
        if ends:
            out.append((old_ids, [old_ends[c] for c in ends], new_ids, [new_ends[c] for c in ends]))
            total += len(ends)
        if total >= rows:
            break
    return out


@torch.no_grad()
def module_inputs(model, texts_ids: list[list[int]], positions: list[list[int]], names: set[str]) -> dict:
    """Inputs of the named Linear modules at the kept positions, one text at a time: name -> rows × in (float32)."""
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: list[int] = []
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: kept[n].append(args[0][0, current].detach().float().clone())) for n in names]
    try:
        for ids, pos in zip(texts_ids, positions, strict=True):
            current[:] = pos
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in kept.items()}


# ----------------------------------------------------------------------------- the fits

PROJECTIONS = 64     # random projections of the new outputs on which the output map's ridge is chosen


def solve_features(A: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The ridge fit A X ≈ targets, ρ chosen on held-out rows, and its R² in sample and held out."""
    from lorasuite_core.transfer.activation_fit import choose_ridge, held_out_errors, r_squared, ridge

    A, targets = A.double(), targets.double()
    rho = choose_ridge(A, targets)
    X = ridge(A, targets, rho)
    total = float((targets - targets.mean(dim=0, keepdim=True)).pow(2).sum())
    held = float(held_out_errors(A, targets, (rho,))[0])
    return X, {"rho": rho, "r2": round(r_squared(A, X, targets), 4),
               "r2_held_out": round(1 - held / total, 4) if total > 0 else 1.0}


def input_side(X_n: torch.Tensor, X_o: torch.Tensor, As: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """A T for each A of the modules reading this input: the ridge of the adapter's input features X_o Aᵀ on X_n
    (column by column the same as T = argmin ‖X_n Tᵀ − X_o‖ then A T; ρ chosen on those features)."""
    targets = torch.cat([X_o.double() @ A.T for A in As], dim=1)
    X, diag = solve_features(X_n, targets)
    return list(X.T.split([A.shape[0] for A in As])), diag


def output_side(Y_o: torch.Tensor, Y_n: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """S B with S = Y_nᵀ Y_o (Y_oᵀ Y_o + λI)⁻¹ (out_n × out_o, never formed); ρ chosen on the held-out error of
    ``PROJECTIONS`` random projections of Y_n (an unbiased estimate of the whole error)."""
    from lorasuite_core.transfer.activation_fit import _solve

    g = torch.Generator().manual_seed(0)
    R = torch.randn(Y_n.shape[1], PROJECTIONS, generator=g, dtype=torch.float64) / PROJECTIONS ** 0.5
    Y_o, Y_n = Y_o.double(), Y_n.double()
    _, diag = solve_features(Y_o, Y_n @ R)
    return Y_n.T @ (Y_o @ _solve(Y_o.T @ Y_o, B, diag["rho"])), diag


def carry(adapter_path: Path, old_model, new_model, mapping: list[tuple[int, int]], old_in: dict, new_in: dict,
          old_names: dict, new_names: dict) -> tuple[dict[str, torch.Tensor], int, dict]:
    """New LoRA factors (PEFT keys of the new model) for every module of the old adapter (module docstring)."""
    from safetensors.torch import load_file

    factors = load_file(str(adapter_path / "adapter_model.safetensors"))
    old: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in factors.items():
        m = KEY.search(key)
        if m:
            old.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = value.double()
    per_new: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    diag: dict[str, dict] = {}
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    for i, j in mapping:
        for group in groups:
            projs = [p for p in group if (i, p) in old]
            if not projs:
                continue
            X_o, X_n = old_in[old_names[(i, projs[0])]], new_in[new_names[(j, projs[0])]]
            carried_A, d_in = input_side(X_n, X_o, [old[(i, p)]["A"] for p in projs])
            for proj, A_new in zip(projs, carried_A):
                W_o = old_model.get_submodule(old_names[(i, proj)]).weight.detach().double()
                W_n = new_model.get_submodule(new_names[(j, proj)]).weight.detach().double()
                B_new, d_out = output_side(X_o.double() @ W_o.T, X_n.double() @ W_n.T, old[(i, proj)]["B"])
                per_new.setdefault((j, proj), []).append((B_new, A_new))
                diag[f"{i}->{j}.{ROLES[proj]}"] = {"input": d_in, "output": d_out}
    rank = max(len(v) for v in per_new.values()) * next(iter(old.values()))["A"].shape[0]
    out = {}
    for (j, proj), parts in per_new.items():
        B = torch.cat([b for b, _ in parts], dim=1)
        A = torch.cat([a for _, a in parts], dim=0)
        B = torch.nn.functional.pad(B, (0, rank - B.shape[1]))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - A.shape[0]))
        prefix = "base_model.model." + new_names[(j, proj)]
        out[f"{prefix}.lora_A.weight"] = A.float().contiguous()
        out[f"{prefix}.lora_B.weight"] = B.float().contiguous()
    return out, rank, diag


def linear_names(model) -> dict[tuple[int, str], str]:
    names = {}
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)\..*\.(\w+_proj)$", name)
        if m and isinstance(module, torch.nn.Linear):
            names[(int(m.group(1)), m.group(2))] = name
    return names


def write_adapter(out_dir: Path, tensors: dict, rank: int, source_config: dict, new_dir: str) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    scale = source_config["lora_alpha"] / source_config["r"]
    config = {**source_config, "r": rank, "lora_alpha": scale * rank, "base_model_name_or_path": new_dir,
              "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))


def delta_sizes(adapter_dir: str | Path, model: str) -> dict[str, float]:
    """Per role, the mean over modules of ‖s·B A‖_F / ‖W‖_F (the delta's size against its base weight)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    factors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = {}
    for path in Path(model_dir(model)).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            where.update({k: path for k in handle.keys()})
    sizes: dict[str, list[float]] = {}
    for key, A in factors.items():
        m = re.search(r"(model\.layers\.\d+\..*\.(\w+_proj))\.lora_A\.weight$", key)
        if not m:
            continue
        B = factors[key.replace("lora_A", "lora_B")].double()
        with safe_open(str(where[m.group(1) + ".weight"]), "pt") as handle:
            W = handle.get_tensor(m.group(1) + ".weight").double()
        delta = config["lora_alpha"] / config["r"] * torch.linalg.matrix_norm(B @ A.double())
        sizes.setdefault(ROLES[m.group(2)], []).append(float(delta / torch.linalg.matrix_norm(W)))
    return {role: round(sum(v) / len(v), 5) for role, v in sizes.items()}


# ----------------------------------------------------------------------------- one skill

def heldout_of(work: Path, skill: str) -> Path:
    """The fidelity entry of transfer_fit.py's activations fleet for ``skill`` (its held-out prompts + answers)."""
    report = json.loads((work / "transfer-fit-activations-heldout-ridge" / skill / "migration_report.json").read_text())
    want = report["fidelity"]["adapters"]["transfer"]
    for facts in (work / "store" / "fidelity").glob("*/_stage.json"):
        if json.loads(facts.read_text()).get("adapters", {}).get("transfer") == want:
            return facts.parent / "heldout_prompts.json"
    raise SystemExit(f"no fidelity entry of the activations fleet for {skill} under {work / 'store'}")


def probe(work: Path, skill: str, args) -> dict:
    from lorasuite_core.training.fidelity import measure_fidelity
    from lorasuite_core.training.heldout import read_heldout
    from lorasuite_core.training.train import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    old_dir, new_dir = (model_dir(m) for m in PAIRS["cross"])
    source = work / "adapters" / skill / "old_adapter-s0"
    weights_dir = work / "transfer-fit-weights" / skill
    acts_dir = work / "transfer-fit-activations-heldout-ridge" / skill
    report = json.loads((acts_dir / "migration_report.json").read_text())
    mapping = [tuple(p) for p in report["layer_mapping"]]
    texts = calibration_texts(old_dir, str(source), skill, args.prompts)
    rows = paired_rows(load_tokenizer(old_dir), load_tokenizer(new_dir), texts, args.rows)
    old_model, new_model = (load_causal_lm(d, dtype="float32", device="cpu").eval() for d in (old_dir, new_dir))
    old_names, new_names = linear_names(old_model), linear_names(new_model)
    used_old = {old_names[(i, p)] for i, _ in mapping for p in ROLES if (i, p) in old_names}
    used_new = {new_names[(j, p)] for _, j in mapping for p in ROLES if (j, p) in new_names}
    old_in = module_inputs(old_model, [r[0] for r in rows], [r[1] for r in rows], used_old)
    new_in = module_inputs(new_model, [r[2] for r in rows], [r[3] for r in rows], used_new)
    tensors, rank, diag = carry(source, old_model, new_model, mapping, old_in, new_in, old_names, new_names)
    del old_in, new_in, old_model, new_model
    out_dir = Path(args.out) / skill
    write_adapter(out_dir, tensors, rank, json.loads((source / "adapter_config.json").read_text()), new_dir)
    fit_seconds = time.perf_counter() - start
    prompts, teacher, _ = read_heldout(heldout_of(work, skill))
    fid = measure_fidelity(old_dir, source, new_dir, {"weights": weights_dir, "activations": acts_dir,
                                                      "module_fit": out_dir}, prompts, [c.text for c in teacher],
                           dtype="float32", device="cpu")
    result = {"fidelity": fid.to_dict(), "rows": sum(len(r[1]) for r in rows), "texts": len(rows), "rank": rank,
              "fits": diag, "fit_seconds": round(fit_seconds, 1), "adapter": str(out_dir),
              "reported_fidelity_activations": report["fidelity"]["fidelity"]["transfer"]}
    result["delta_sizes"] = {"old": delta_sizes(source, PAIRS["cross"][0]),
                             "module_fit": delta_sizes(out_dir, PAIRS["cross"][1])}
    if args.accuracy:
        from lorasuite_core.training.evaluation import evaluate
        from lorasuite_core.training.samples import load_samples

        acc = evaluate(new_dir, load_samples(f"task:{skill}:test:100", None, seed=0), adapter_dir=str(out_dir),
                       batch_size=32, show_progress=False)
        result["accuracy"] = acc.to_dict()
    result.update(seconds=round(time.perf_counter() - start, 1), cpu_seconds=round(time.process_time() - cpu0, 1),
                  peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2), load=loadavg())
    return result


# ----------------------------------------------------------------------------- report

def summary(fits: dict, side: str, role: str, key: str, median: bool = False) -> float:
    values = sorted(v[side][key] for k, v in fits.items() if k.endswith("." + role))
    return values[len(values) // 2] if median else sum(values) / len(values)


def write_markdown() -> str:
    data = json.loads(RESULTS.read_text())
    lines = ["# Every LoRA module carried by maps fitted on its own activations (cross pair, transfer only)", "",
             "Generated by `benchmarks/module_fit_probe.py --markdown` from `benchmarks/results/module_fit_cross.json`;"
             " the maps are defined in the script's docstring.", "",
             f"- command: `{data['command']}`",
             f"- machine: {data['machine']['cpu']}, {data['machine']['gemm']}, torch threads {data['machine']['threads']},"
             f" started {data['machine']['started']}", "",
             "F on the 16 held-out test prompts of `transfer_fit.py`'s activations fleet (the same prompts and teacher"
             " answers for every column; the weights and activations adapters are that benchmark's):", "",
             "| skill | rows | F weights | F activations (residual side) | F module fit | accuracy, module fit (100) |",
             "|---|---|---|---|---|---|"]
    for skill, r in data["skills"].items():
        f = r["fidelity"]["fidelity"]
        acc = f"{r['accuracy']['accuracy']:.2f}" if "accuracy" in r else "–"
        lines.append(f"| {skill} | {r['rows']} | {f['weights']:.3f} | {f['activations']:.3f} | {f['module_fit']:.3f} |"
                     f" {acc} |")
    lines += ["", "R² of the fits over the mapped layer pairs, per module: the mean in sample / the median held out (2 folds"
              " of the rows; a held-out row shares its text with fitted ones, so these are optimistic; the median"
              " because one layer's down output is predicted far worse than its mean, R² < −100, on held-out rows):", "",
              "| skill | side | " + " | ".join(ROLES.values()) + " |", "|---|---|" + "---|" * len(ROLES)]
    for skill, r in data["skills"].items():
        for side in ("input", "output"):
            cells = [f"{summary(r['fits'], side, role, 'r2'):.2f} / {summary(r['fits'], side, role, 'r2_held_out', True):.2f}"
                     for role in ROLES.values()]
            lines.append(f"| {skill} | {side} | " + " | ".join(cells) + " |")
    lines += ["", "Size of the deltas, ‖s·BA‖ / ‖W‖ averaged over the modules of a role (old adapter → module fit):",
              "", "| skill | " + " | ".join(ROLES.values()) + " |", "|---|" + "---|" * len(ROLES)]
    for skill, r in data["skills"].items():
        if "delta_sizes" in r:
            d = r["delta_sizes"]
            lines.append(f"| {skill} | " + " | ".join(f"{d['old'][x]:.4f} → {d['module_fit'][x]:.4f}"
                                                    for x in ROLES.values()) + " |")
    lines += ["", "Cost per skill (fits, adapter, fidelity): " + "; ".join(
        f"{s} {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} CPU s, peak RSS {r['peak_rss_gb']} GB"
        for s, r in data["skills"].items()), ""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "MODULE_FIT.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/work/wt/skills/runs/skill-fleet/cross")
    parser.add_argument("--skills", nargs="+", default=["arithmetic", "family_relationships", "knowledge", "chain_sum"])
    parser.add_argument("--prompts", type=int, default=300, help="training prompts (with teacher answers) to read")
    parser.add_argument("--rows", type=int, default=4096, help="at most this many distinct paired positions")
    parser.add_argument("--out", default="/tmp/module-fit", help="where the carried adapters are written")
    parser.add_argument("--accuracy", action="store_true", help="also evaluate on the 100 test problems")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--delta-sizes", action="store_true", help="add the deltas' sizes to the recorded skills")
    parser.add_argument("--results", type=Path, help="results JSON in place of benchmarks/results/module_fit_cross.json")
    args = parser.parse_args()
    global RESULTS
    RESULTS = args.results or RESULTS_DEFAULT
    if args.markdown:
        print(write_markdown())
        return
    if args.delta_sizes:          # for skills recorded before the sizes were part of a run
        data = json.loads(RESULTS.read_text())
        for skill, r in data["skills"].items():
            r["delta_sizes"] = {"old": delta_sizes(Path(args.workdir) / "adapters" / skill / "old_adapter-s0",
                                                   PAIRS["cross"][0]),
                                "module_fit": delta_sizes(r["adapter"], PAIRS["cross"][1])}
        merge_json(RESULTS, {"skills": data["skills"]})
        return
    args.threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    command = (f"LORASUITE_BENCH_THREADS={args.threads} nice -n 19 .venv/bin/python benchmarks/module_fit_probe.py "
               + shlex.join(sys.argv[1:]))
    before = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if "machine" not in before:
        torch.set_num_threads(args.threads)
        merge_json(RESULTS, {"machine": {"cpu": cpu_model(), "threads": args.threads,
                                         "gemm": f"1024² GEMM {gemm_gflops(n=1024):.0f} GFLOP/s float32",
                                         "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}})
    done = before.get("skills", {})
    for skill in args.skills:
        if skill in done:
            continue
        print(f"[module-fit] {skill} ...", flush=True)
        done[skill] = probe(Path(args.workdir), skill, args)
        merge_json(RESULTS, {"command": command, "skills": done})
        print(f"[module-fit] {skill}: F {done[skill]['fidelity']['fidelity']}", flush=True)


if __name__ == "__main__":
    main()
