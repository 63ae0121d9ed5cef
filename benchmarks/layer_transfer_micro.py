"""Per-layer adapter transfer time at Qwen2.5-0.5B -> 1.5B widths, random weights.

Times ``migrate.transfer_new_layer`` (carry every old layer mapped onto one new layer, sum,
re-factorise) for one old layer (k = 1) and two old layers summed onto one new layer (k = 2,
truncated back to rank r), rank-16 adapter on q, k, v, o, gate, up, down. The weights, residual
maps and unit matches are random (matching is not timed here); only the shapes matter for the
time. Whatever ``lorasuite_core`` is importable is measured, so the code before a change runs
from a git worktree:

    git worktree add /tmp/lorasuite-before 898f7d4
    PYTHONPATH=/tmp/lorasuite-before .venv/bin/python benchmarks/layer_transfer_micro.py --label before
    .venv/bin/python benchmarks/layer_transfer_micro.py --label after

Each run merges its entry into the JSON file (``--out``) under its label, with the command,
torch threads, date, machine, the imported package path, seconds per repeat and, per module,
‖s B A‖_F and the refactorisation residual (equal between labels when both compute the same
adapter).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lorasuite_core
from _common import merge_json
from lorasuite_core.models.families import family_for_model_type
from lorasuite_core.models.loading import Dims, LoraAdapter
from lorasuite_core.models.variants.base import LoraFactors
from lorasuite_core.transfer.matching import LayerMatch
from lorasuite_core.transfer.adapter import PairAnalysis, transfer_new_layer
from lorasuite_core.transfer.residual import ResidualTransfer

OLD = Dims(hidden=896, num_layers=2, num_heads=14, num_kv_heads=2, head_dim=64, intermediate=4864, norm_eps=1e-6)
NEW = Dims(hidden=1536, num_layers=2, num_heads=12, num_kv_heads=2, head_dim=128, intermediate=8960, norm_eps=1e-6)
RANK, ALPHA = 16, 32.0


@dataclass
class RandomModel:
    """What transfer_new_layer reads of a LoadedModel: family, dims, layer weights and norm gains."""
    family: object
    dims: Dims
    layers: list[dict[str, torch.Tensor]]
    gains: list[dict[str, torch.Tensor]]

    def layer_weight(self, layer: int, path: str, suffix: str = "weight") -> torch.Tensor:
        return self.layers[layer][path]

    def norm_gain(self, layer: int, norm_role: str):
        return self.gains[layer].get(norm_role)

    def norm_bias(self, layer: int, norm_role: str):
        return None


def shapes(d: Dims) -> dict[str, tuple[int, int]]:
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    return {"q": (q, d.hidden), "k": (kv, d.hidden), "v": (kv, d.hidden), "o": (d.hidden, q),
            "gate": (d.intermediate, d.hidden), "up": (d.intermediate, d.hidden), "down": (d.hidden, d.intermediate)}


def random_model(family, d: Dims, g: torch.Generator) -> RandomModel:
    layers, gains = [], []
    for _ in range(d.num_layers):
        layer = {}
        for spec in family.modules.values():
            out, inp = shapes(d)[spec.role]
            layer[spec.path] = torch.randn(out, inp, generator=g, dtype=torch.float64) / inp ** 0.5
        layers.append(layer)
        gains.append({role: 0.5 + torch.rand(d.hidden, generator=g, dtype=torch.float64)
                      for role in ("attention_input", "mlp_input") if family.norms.get(role)})
    return RandomModel(family, d, layers, gains)


def random_match(g: torch.Generator) -> LayerMatch:
    heads = min(OLD.num_heads, NEW.num_heads)
    h_o = torch.randperm(OLD.num_heads, generator=g)[:heads].tolist()
    h_n = torch.randperm(NEW.num_heads, generator=g)[:heads].tolist()
    neurons = np.stack([np.arange(OLD.intermediate),
                        torch.randperm(NEW.intermediate, generator=g)[:OLD.intermediate].numpy()], axis=1)
    return LayerMatch(head_pairs=sorted(zip(h_o, h_n)), kv_pairs=[(0, 1), (1, 0)], neuron_pairs=neurons,
                      head_similarity=np.zeros((OLD.num_heads, NEW.num_heads)), neuron_similarity_mean=0.0)


def random_adapter(family, g: torch.Generator) -> LoraAdapter:
    factors = {}
    for layer in range(OLD.num_layers):
        for name, spec in family.modules.items():
            out, inp = shapes(OLD)[spec.role]
            A = torch.randn(RANK, inp, generator=g, dtype=torch.float64) / inp ** 0.5
            B = torch.randn(out, RANK, generator=g, dtype=torch.float64) / RANK ** 0.5
            factors[(layer, name)] = LoraFactors(A, B, ALPHA / RANK, ALPHA)
    return LoraAdapter("random", Path("."), {}, factors)


def setup(seed: int = 0):
    family = family_for_model_type("qwen2")
    g = torch.Generator().manual_seed(seed)
    old, new = random_model(family, OLD, g), random_model(family, NEW, g)
    P = torch.randn(OLD.hidden, NEW.hidden, generator=g, dtype=torch.float64) / NEW.hidden ** 0.5
    Q = torch.randn(NEW.hidden, OLD.hidden, generator=g, dtype=torch.float64) / OLD.hidden ** 0.5
    rt = ResidualTransfer(P=P, Q=Q, scale=1.0, fit_residual_old=0.0, fit_residual_new=0.0)
    analysis = PairAnalysis(None, rt, np.zeros((2, 2)), np.zeros((3, 3)), [(0, 0), (1, 0)],
                            matches={0: random_match(g), 1: random_match(g)})
    return old, new, analysis, random_adapter(family, g)


def module_summary(result) -> dict[str, dict[str, float]]:
    out = {}
    for m in result.modules:
        A, B = m.factors.A.double(), m.factors.B.double()
        s = m.alpha / m.rank
        norm = float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0).sqrt()) * s
        out[m.name] = {"norm_sBA": round(norm, 6), "residual": round(m.factors.residual, 8)}
    return out


def git_commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="entry name in the JSON file, e.g. before / after")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="lstsq", choices=("lstsq", "paper"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_transfer_micro.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    old, new, analysis, adapter = setup()
    cases = {}
    for name, sources in (("k1_one_old_layer", [0]), ("k2_two_old_layers_summed", [0, 1])):
        seconds, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = transfer_new_layer(old, new, analysis, adapter, 0, sources, args.mode)
            seconds.append(round(time.perf_counter() - start, 3))
        cases[name] = {"sources": sources, "seconds": seconds, "best_seconds": min(seconds),
                       "modules": module_summary(result)}
        print(f"{args.label} {name}: {seconds} s", flush=True)
    package = Path(lorasuite_core.__file__).resolve().parent
    entry = {
        "command": " ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                            + [".venv/bin/python", *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "note": "2-core VM shared with other jobs, no GPU",
                    "loadavg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "package": str(package), "package_commit": git_commit(package.parent),
        "mode": args.mode,
        "shapes": {"old": vars(OLD), "new": vars(NEW), "rank": RANK, "alpha": ALPHA,
                   "targets": ["q", "k", "v", "o", "gate", "up", "down"]},
        "cases": cases,
    }
    merge_json(args.out, {args.label: entry})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
