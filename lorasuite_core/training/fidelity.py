"""Fidelity: the share of the teacher's behaviour that a migrated adapter carries.

On held-out prompts ``x_1 .. x_n`` the teacher ``T`` (old model + old adapter) writes its greedy
completions ``y_i`` (:func:`~lorasuite_core.training.distill.greedy_completions`, cut as evaluation
scores them).  Every model ``M`` is then scored on the teacher's text, per character so that
tokenizers do not matter::

    L(M) = sum_i NLL_M(y_i | P(x_i)) / sum_i len(y_i)          (nats per character)

``NLL_M`` sums ``-log p_M`` over ``M``'s own encoding of ``y_i`` read after its own encoding of the
prompt ``P(x_i)`` (:func:`~lorasuite_core.training.task_data.format_prompt`), encoded separately as
LFT builds its examples; no EOS term (the teacher's text ends where evaluation cuts it, not where
the teacher stopped).  Four models::

    A0 = L(old model)      A1 = L(old model + old adapter)     (the teacher itself)
    B0 = L(new model)      B1 = L(new model + migrated adapter)

    F = (B0 - B1) / (B0 - A1)

the share of the gap between the bare new model and the teacher that the migrated adapter closes:
1 when it explains the teacher's answers as well as the teacher does (a function-preserving upgrade
migrated exactly gives ``B1 = A1``), 0 when it is no better than the bare new model, negative when
worse.  ``F`` is undefined (None) when ``B0 <= A1``: the bare new model already explains the
teacher's answers as well as the teacher, so there is no gap to close.  ``A0 - A1`` says how much
the old adapter changes the old model's behaviour on these prompts.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class Fidelity:
    """Per-character losses of the four models (and of further adapters on the new model) and F for each."""

    n: int
    characters: int
    old: float        # A0
    teacher: float    # A1
    new: float        # B0
    adapters: dict[str, float] = field(default_factory=dict)   # B1 per named adapter ("transfer", "lft")

    @property
    def fidelity(self) -> dict[str, float | None]:
        return {name: fidelity_of(self.new, loss, self.teacher) for name, loss in self.adapters.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fidelity": self.fidelity}


def fidelity_of(bare_new: float, migrated: float, teacher: float) -> float | None:
    """``(B0 - B1) / (B0 - A1)``; None where ``B0 <= A1`` (no gap to close)."""
    gap = bare_new - teacher
    return None if gap <= 0 else (bare_new - migrated) / gap


def scoring_examples(tokenizer, prompts: Sequence, texts: Sequence[str]) -> list[dict[str, list[int]]]:
    """``prompt ids + completion ids`` with labels -100 over the prompt (no EOS); prompts are ``prompts.Prompt``."""
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} completions")
    examples = []
    for prompt, text in zip(prompts, texts):
        prompt_ids = tokenizer(prompt.formatted(), add_special_tokens=True)["input_ids"]
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": prompt_ids + target, "labels": [-100] * len(prompt_ids) + target})
    return examples


@torch.no_grad()
def completion_nll(model, tokenizer, prompts: Sequence, texts: Sequence[str], *, batch_size: int = 8) -> float:
    """``sum_i NLL_M(y_i | P(x_i))`` in nats (float64 sum of float32 token terms); the model's active adapter."""
    from lorasuite_core.training.train import collate, labelled_logits

    examples = [e for e in scoring_examples(tokenizer, prompts, texts) if any(l != -100 for l in e["labels"])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad).items()}
        logits, targets = labelled_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double())
    return total


def per_character(model, tokenizer, prompts: Sequence, texts: Sequence[str], *, batch_size: int = 8) -> float:
    """``L(M)``: :func:`completion_nll` over the number of characters of the texts."""
    characters = sum(len(t) for t in texts)
    if characters == 0:
        raise ValueError("fidelity: the teacher's completions are all empty")
    return completion_nll(model, tokenizer, prompts, texts, batch_size=batch_size) / characters


def _with_and_without(model_dir, adapter_dir, prompts, texts, dtype: str, device: str) -> tuple[float, float]:
    """``(L(base), L(base + adapter))`` from one loaded model."""
    from lorasuite_core.training.evaluation import load_for_generation

    model, tokenizer = load_for_generation(model_dir, adapter_dir, dtype=dtype, device=device)
    with_adapter = per_character(model, tokenizer, prompts, texts)
    with model.disable_adapter():
        bare = per_character(model, tokenizer, prompts, texts)
    return bare, with_adapter


def _bare_and_each(model_dir, adapters: dict[str, str | Path], prompts, texts, dtype: str,
                   device: str) -> tuple[float, dict[str, float]]:
    """``(L(base), {name: L(base + adapter)})`` from one loaded model holding every adapter (B0 scored once)."""
    from lorasuite_core.training.evaluation import load_adapters_for_generation

    model, tokenizer = load_adapters_for_generation(model_dir, adapters, dtype=dtype, device=device)
    with model.disable_adapter():
        bare = per_character(model, tokenizer, prompts, texts)
    scored = {}
    for name in adapters:
        model.set_adapter(name)
        scored[name] = per_character(model, tokenizer, prompts, texts)
    return bare, scored


def measure_fidelity(old_model_dir: str | Path, source_adapter_dir: str | Path, new_model_dir: str | Path,
                     adapters: dict[str, str | Path], prompts: Sequence, teacher_texts: Sequence[str], *,
                     dtype: str = "float32", device: str = "auto") -> Fidelity:
    """A0, A1 from the teacher; B0 and each named adapter's B1 from one new model holding every adapter."""
    if not prompts:
        raise ValueError("fidelity needs held-out prompts")
    if not adapters:
        raise ValueError("fidelity needs at least one adapter on the new model")
    old, teacher = _with_and_without(old_model_dir, source_adapter_dir, prompts, teacher_texts, dtype, device)
    new, scored = _bare_and_each(new_model_dir, adapters, prompts, teacher_texts, dtype, device)
    result = Fidelity(n=len(prompts), characters=sum(len(t) for t in teacher_texts), old=old, teacher=teacher,
                      new=new, adapters=scored)
    logger.debug("fidelity on %d held-out prompts: %s (nats/char: teacher %.3f, new %.3f, %s)", result.n,
                ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in result.fidelity.items()),
                teacher, new, ", ".join(f"{k} {v:.3f}" for k, v in scored.items()))
    return result
