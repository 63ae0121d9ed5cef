"""Vanilla LoRA training and light fine-tuning (LFT) of migrated adapters, with PEFT.

Design
------
* :func:`train_lora` trains a *fresh* LoRA adapter (PEFT's own initialisation:
  Kaiming-uniform A, zero B) on a base model directory.
* :func:`light_finetune` is the LoRASuite LFT step: it starts from a *given*
  (migrated) adapter's A/B matrices, loaded by :func:`load_for_light_finetune`
  with ``PeftModel.from_pretrained(..., is_trainable=True)``, and trains them
  for a few hundred samples (no warmup; the learning rate is the caller's: the options' ``lft_lr``).
* Both share one small, explicit training loop (:func:`_run_training`) instead
  of ``transformers.Trainer``: fewer moving parts, exact control of
  determinism, and loss masking that is easy to test.

Data: each :class:`~lorasuite_core.training.task_data.Sample` becomes
``tokens(format_prompt(sample)) + tokens(output) + [eos]``; the prompt part is
tokenised on its own, exactly as at evaluation time, and its labels are -100 so
the loss covers only the output (+ EOS) tokens.  Sequences are truncated to
``max_length`` (samples whose prompt alone fills ``max_length`` are dropped
with a warning) and right-padded per batch.

Epochs: every epoch reshuffles; with an epoch selector (distillation's early stopping,
:mod:`lorasuite_core.training.early_stopping`) the model is scored after each epoch, training may stop
there, and the selected epoch's weights are saved instead of the last ones.

Determinism: ``torch.manual_seed(seed)`` right before the adapter is created
(so PEFT's init is reproducible) and a separate seeded ``torch.Generator`` for
the per-epoch shuffling.  Same seed, same data, same device => identical
adapter weights.

Devices, dtypes, memory: :mod:`lorasuite_core.training.devices`.  With float32 weights each
micro-batch's forward pass runs under ``torch.autocast(dtype=bfloat16)`` where the hardware multiplies
bf16 natively (``TrainConfig.autocast`` "auto"; "bf16" forces it, "off" keeps fp32).  Weights,
gradients, the optimizer state and the loss reduction stay float32 (the loss is computed from float32
logits, the backward pass runs outside the autocast region); only the matrix products round their
inputs to bf16.  PEFT keeps the adapter weights in float32 even over a bf16 base.  Inside the loop the
frozen linear weights of a bf16 checkpoint are held in bf16 (:mod:`~lorasuite_core.training.frozen_bf16`): the
same products, without a float32 copy and a bf16 copy of every weight at once.  The pipeline puts
the compute dtype in the LFT and baseline stage keys, since it changes the trained weights.

Safety: models and adapters are read from safetensors only
(``use_safetensors=True``; an adapter without ``adapter_model.safetensors`` is
refused) and ``trust_remote_code`` is always False.

Memory: :class:`TrainResult` reports the process peak RSS (the OS high-water
mark for the whole process lifetime, via ``resource``) and, on CUDA,
``torch.cuda.max_memory_allocated`` measured from the start of the call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from lorasuite_core.training.devices import (autocast_dtype, cuda_peak_mb, process_peak_rss_mb, reset_cuda_peak,
                                             resolve_device, resolve_dtype)
from lorasuite_core.training.config import DEFAULT_TARGETS, LORA_SHAPE, TrainConfig
from lorasuite_core.training.frozen_bf16 import bf16_frozen_linears
from lorasuite_core.training.task_data import Sample, format_prompt

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SUMMARY_FILE = "training_summary.json"
LossFn = Callable[[Any, list[dict]], torch.Tensor]  # (model, micro-batch example dicts) -> scalar loss


class EpochSelector(Protocol):
    """Scores the model after each epoch (``end_of_epoch``: True stops training) and, before the adapter is saved,
    writes back the weights it chose (``restore``); e.g. :class:`~lorasuite_core.training.early_stopping.EarlyStopping`."""

    def end_of_epoch(self, epoch: int, model) -> bool: ...

    def restore(self, model) -> None: ...


@dataclass
class TrainResult:
    """Outcome of :func:`train_lora` / :func:`light_finetune` (also written to ``training_summary.json``)."""

    out_dir: Path
    seconds: float
    steps: int
    final_loss: float
    n_samples: int
    trainable_params: int
    peak_rss_mb: float
    peak_cuda_mb: float | None
    device: str
    dtype: str
    compute_dtype: str = "float32"   # the matrix products' dtype: "bfloat16" under autocast
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


# --------------------------------------------------------------------------- loading

def load_tokenizer(model_dir: str | Path, padding_side: str = "right"):
    """Tokenizer of ``model_dir`` with a pad token (falls back to EOS) and the given padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {model_dir} has no EOS token; cannot mark the end of outputs")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(model_dir: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load a safetensors causal LM from a local directory onto the resolved device/dtype."""
    from transformers import AutoModelForCausalLM

    model_path = Path(model_dir)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_path}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
    )
    return model.to(torch_device)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of all ``nn.Linear`` modules (LoRA candidates)."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def check_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every target with no matching Linear module (suffix match, as PEFT)."""
    names = linear_module_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"LoRA target modules {missing} not found in model; its Linear modules are {leaf_names}")


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """The adapter directory must hold adapter_config.json and adapter_model.safetensors (no pickles)."""
    path = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"adapter directory {path} lacks {name}")
    return path


# --------------------------------------------------------------------------- data

def build_example(tokenizer, sample: Sample, max_length: int) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + output + EOS, ``labels`` = -100 over the prompt; None if no label survives."""
    prompt_ids = tokenizer(format_prompt(sample), add_special_tokens=True)["input_ids"]
    output_ids = tokenizer(sample.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + output_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + output_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def build_examples(tokenizer, samples: Sequence[Sample], max_length: int) -> list[dict[str, list[int]]]:
    """Tokenise all samples; drops (with a warning) those whose prompt fills ``max_length``."""
    examples = [build_example(tokenizer, s, max_length) for s in samples]
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        logger.warning("dropped %d samples whose prompt is >= max_length=%d tokens", len(examples) - len(kept),
                       max_length)
    if not kept:
        raise ValueError(f"no trainable samples: all {len(samples)} prompts are >= max_length={max_length} tokens")
    return kept


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def _batches(n_examples: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def _groups(batches: list[list[int]], grad_accum: int) -> Iterator[list[list[int]]]:
    for start in range(0, len(batches), grad_accum):
        yield batches[start:start + grad_accum]


# --------------------------------------------------------------------------- model preparation

def _lora_config(rank: int, alpha: float, targets: Sequence[str], use_dora: bool = False):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", use_dora=use_dora)


def prepare_fresh_lora(model_dir: str | Path, *, rank: int = LORA_SHAPE.rank, alpha: float = LORA_SHAPE.alpha,
                       targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0, dtype: str = "auto",
                       device: str = "auto", use_dora: bool = False):
    """Base model + new PEFT LoRA (DoRA with ``use_dora``; seeded init); returns ``(peft_model, tokenizer)``."""
    from peft import get_peft_model

    model = load_causal_lm(model_dir, dtype=dtype, device=device)
    check_targets(model, targets)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, _lora_config(rank, alpha, targets, use_dora))
    return peft_model, load_tokenizer(model_dir)


def load_for_light_finetune(model_dir: str | Path, adapter_dir: str | Path, *, dtype: str = "auto",
                            device: str = "auto"):
    """Base model + the given adapter as a *trainable* PeftModel; returns ``(peft_model, tokenizer)``.

    The LoRA A/B weights equal the adapter file's weights exactly (no re-initialisation).
    """
    from peft import PeftConfig, PeftModel

    adapter_path = check_adapter_dir(adapter_dir)
    model = load_causal_lm(model_dir, dtype=dtype, device=device)
    adapter_config = PeftConfig.from_pretrained(str(adapter_path))
    targets = adapter_config.target_modules
    if isinstance(targets, (list, set, tuple)):
        check_targets(model, sorted(targets))
    peft_model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    return peft_model, load_tokenizer(model_dir)


# --------------------------------------------------------------------------- training loop

def _scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = int(round(config.warmup_ratio * total_steps))
    if config.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def labelled_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, projecting only those positions onto the vocabulary.

    Equals the model's own ``labels=`` loss, but prompt and padding positions never reach the LM head: for small
    models with large vocabularies (262k rows for a 640-wide model) that projection is most of a step's compute
    and memory, and prompts are most of each sequence.
    """
    logits, targets = labelled_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` at the labelled positions only: ``(n_labelled, V)`` (soft-capped as the model does)
    and ``(n_labelled,)``, rows in row-major (example, position) order."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.base_model  # the transformer stack under the LM head (LoRA layers included)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, D)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    scored = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][scored])  # (n_labelled, V)
    cap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, targets[scored]


def _train_step(model, group: list[list[int]], examples, pad_id: int, device: torch.device,
                loss_fn: LossFn | None = None, mixed: torch.dtype | None = None) -> float:
    """Forward/backward over the micro-batches of one optimizer step; returns their mean loss.

    ``loss_fn(model, chunk)`` (chunk: that micro-batch's example dicts) replaces the labelled cross-entropy.
    ``mixed``: the forward pass runs under ``torch.autocast`` with that dtype; the backward pass outside it.
    """
    total = 0.0
    for indices in group:
        chunk = [examples[i] for i in indices]
        with torch.autocast(device.type, dtype=mixed or torch.float32, enabled=mixed is not None):
            if loss_fn is not None:
                loss = loss_fn(model, chunk)
            else:
                loss = labelled_token_loss(model, {k: v.to(device) for k, v in collate(chunk, pad_id).items()})
        loss = loss.float()
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite training loss {loss.item()}; lower the learning rate or check the data")
        (loss / len(group)).backward()
        total += loss.item()
    return total / len(group)


def _trainable_parameters(peft_model) -> list[torch.nn.Parameter]:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (adapter not loaded as trainable?)")
    return params


def _optimise(peft_model, tokenizer, examples, params, config: TrainConfig, device: torch.device,
              loss_fn: LossFn | None = None, selector: EpochSelector | None = None,
              frozen: Sequence[torch.nn.Module] = ()) -> list[float]:
    """AdamW over seeded shuffled batches for ``config.epochs``; returns the loss of every optimizer step.
    ``selector.end_of_epoch(epoch, model)`` after each epoch; True ends training there.  ``frozen``: other models
    the loss reads (a distillation's teacher), held in bf16 like the model's frozen weights."""
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / config.batch_size) / config.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config, steps_per_epoch * config.epochs)
    losses: list[float] = []
    mixed = autocast_dtype(config.autocast, device, params[0].dtype)
    progress = tqdm(total=steps_per_epoch * config.epochs, desc="train", disable=not config.show_progress)
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(bf16_frozen_linears(model, mixed)) for model in (peft_model, *frozen)]
        for _epoch in range(config.epochs):
            for group in _groups(_batches(len(examples), config.batch_size, generator), config.grad_accum):
                losses.append(_train_step(peft_model, group, examples, tokenizer.pad_token_id, device, loss_fn, mixed))
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if selector is not None:
                with contextlib.ExitStack() as float32:
                    for weights in held:
                        float32.enter_context(weights.float32())
                    if selector.end_of_epoch(_epoch, peft_model):
                        break
    progress.close()
    return losses


def _run_training(peft_model, tokenizer, samples: Sequence[Sample], out_dir: str | Path,
                  config: TrainConfig, *, examples: Sequence[dict] | None = None,
                  loss_fn: LossFn | None = None, selector: EpochSelector | None = None,
                  frozen: Sequence[torch.nn.Module] = ()) -> TrainResult:
    """Shared by LoRA training and LFT; saves the adapter (safetensors) and a JSON summary.

    ``examples`` (pre-built ``input_ids``/``labels`` dicts, extra keys allowed) replace tokenising ``samples``;
    ``loss_fn`` replaces the labelled cross-entropy (see :func:`_train_step`); ``selector`` scores every epoch,
    may stop training, and writes the weights it chose back before saving (:class:`EpochSelector`).
    """
    if not samples and not examples:
        raise ValueError("no training samples given")
    start = time.perf_counter()
    device = next(peft_model.parameters()).device
    reset_cuda_peak(device)
    examples = list(examples) if examples else build_examples(tokenizer, samples, config.max_length)
    params = _trainable_parameters(peft_model)
    peft_model.train()
    losses = _optimise(peft_model, tokenizer, examples, params, config, device, loss_fn, selector, frozen)
    if selector is not None:
        selector.restore(peft_model)
    peft_model.eval()
    return _finish(peft_model, out_dir, config, losses, len(examples), params, start, device)


def _finish(peft_model, out_dir, config: TrainConfig, losses: list[float], n_samples: int, params,
            start: float, device: torch.device) -> TrainResult:
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_path), safe_serialization=True)
    result = TrainResult(out_dir=out_path, seconds=time.perf_counter() - start, steps=len(losses),
                         final_loss=losses[-1], n_samples=n_samples,
                         trainable_params=sum(p.numel() for p in params), peak_rss_mb=process_peak_rss_mb(),
                         peak_cuda_mb=cuda_peak_mb(device), device=str(device),
                         dtype=str(next(peft_model.parameters()).dtype).replace("torch.", ""),
                         compute_dtype=str(autocast_dtype(config.autocast, device, params[0].dtype)
                                           or params[0].dtype).replace("torch.", ""), losses=losses)
    summary = {"result": result.to_dict(), "config": asdict(config)}
    (out_path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    logger.debug("saved adapter to %s (%d steps, final loss %.4f, %.1fs)", out_path, result.steps,
                result.final_loss, result.seconds)
    return result


# --------------------------------------------------------------------------- public entry points

def train_lora(model_dir: str | Path, samples: Sequence[Sample], out_dir: str | Path, *, rank: int = LORA_SHAPE.rank,
               alpha: float = LORA_SHAPE.alpha, targets: Sequence[str] = DEFAULT_TARGETS,
               config: TrainConfig | None = None, use_dora: bool = False) -> TrainResult:
    """Train a fresh LoRA (DoRA with ``use_dora``) adapter on ``model_dir`` and save it (PEFT safetensors) to ``out_dir``."""
    config = config or TrainConfig()
    peft_model, tokenizer = prepare_fresh_lora(model_dir, rank=rank, alpha=alpha, targets=targets,
                                               seed=config.seed, dtype=config.dtype, device=config.device,
                                               use_dora=use_dora)
    logger.debug("training fresh %s r=%d alpha=%s on %s with %d samples", "DoRA" if use_dora else "LoRA", rank, alpha,
                model_dir, len(samples))
    return _run_training(peft_model, tokenizer, samples, out_dir, config)


def light_finetune(model_dir: str | Path, adapter_dir: str | Path, samples: Sequence[Sample],
                   out_dir: str | Path, *, config: TrainConfig) -> TrainResult:
    """LFT: continue training the given (migrated) adapter on ``model_dir`` (``config``: :func:`default_lft_config`)."""
    torch.manual_seed(config.seed)
    peft_model, tokenizer = load_for_light_finetune(model_dir, adapter_dir, dtype=config.dtype,
                                                    device=config.device)
    logger.debug("light fine-tuning %s on %s with %d samples", adapter_dir, model_dir, len(samples))
    return _run_training(peft_model, tokenizer, samples, out_dir, config)


def finetune_examples(peft_model, tokenizer, examples: Sequence[dict], out_dir: str | Path, *,
                      config: TrainConfig, loss_fn: LossFn | None = None,
                      selector: EpochSelector | None = None, frozen: Sequence[torch.nn.Module] = ()) -> TrainResult:
    """The same loop on pre-built examples (extra keys allowed) and an optional loss, e.g. teacher distillation;
    ``selector``: per-epoch scoring and early stopping (:mod:`lorasuite_core.training.early_stopping`); ``frozen``:
    other models ``loss_fn`` runs (the teacher), whose frozen linear weights are held in bf16 during the loop as the
    model's are (:mod:`lorasuite_core.training.frozen_bf16`)."""
    return _run_training(peft_model, tokenizer, (), out_dir, config, examples=examples, loss_fn=loss_fn,
                         selector=selector, frozen=frozen)
