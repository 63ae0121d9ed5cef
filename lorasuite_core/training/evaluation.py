"""Accuracy of a base model (optionally + LoRA adapter) on arithmetic word problems.

Design
------
* Prompts come from :func:`lorasuite_core.training.task_data.format_prompt`, the same
  function training uses, so a trained adapter sees exactly its training prompt.
* Generation is greedy (``do_sample=False``), batched with *left* padding so all
  continuations start at the same column; samples are sorted by prompt length
  to reduce padding, and results are put back in input order.
* Generation of a sequence stops at EOS, at ``max_new_tokens``, or as soon as
  its text is already fully scored (:func:`generation_finished`: a stop marker
  or a complete "The answer is N" appeared), which saves most of the time a
  rambling base model would otherwise spend without changing any score.
* Scoring: the generation is first cut at the first stop marker (a new
  ``### Instruction`` block, ...) and right after the first ``"The answer is N"``
  sentence, so text a base model rambles on with afterwards cannot change the
  score; then :func:`extract_final_number` takes the *last* number left
  (commas, ``$`` and trailing periods tolerated) and :func:`answers_match`
  compares it numerically with the gold answer (absolute tolerance 1e-4).
* :class:`EvalResult` reports accuracy with a 95% Wilson score interval
  (:func:`wilson_interval`), timing and memory (process peak RSS, the OS
  high-water mark, and on CUDA ``torch.cuda.max_memory_allocated`` for the call).

Models and adapters are read from safetensors only; ``trust_remote_code`` is False.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from lorasuite_core.training.task_data import Sample, format_prompt
from lorasuite_core.training.train import (check_adapter_dir, cuda_peak_mb, load_causal_lm, load_tokenizer, process_peak_rss_mb,
                       reset_cuda_peak)

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054  # two-sided 95% normal quantile
STOP_MARKERS = ("### Instruction", "### Input", "### Response", "Below is an instruction")
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
ANSWER_SENTENCE = re.compile(r"answer is\s*:?\s*\$?\s*-?\s*[\d,]*\.?\d+", re.IGNORECASE)
# ... and followed by something that cannot continue the number: the answer is complete
_COMPLETE_ANSWER = re.compile(ANSWER_SENTENCE.pattern + r"(?:[^\d.,]|[.,][^\d])", re.IGNORECASE)


def extract_final_number(text: str) -> str | None:
    """Last number in ``text``, without thousands commas or ``$`` ("The answer is $1,234.5." -> "1234.5")."""
    cleaned = _THOUSANDS_COMMA.sub("", text.replace("$", ""))
    matches = _NUMBER.findall(cleaned)
    if not matches:
        return None
    number = matches[-1]
    return "-0" + number[1:] if number.startswith("-.") else ("0" + number if number.startswith(".") else number)


def _to_float(value: str) -> float | None:
    try:
        return float(value.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def answers_match(pred: str | None, gold: str, tol: float = 1e-4) -> bool:
    """Numeric equality within ``tol`` (absolute); non-numeric gold falls back to exact string match."""
    if pred is None:
        return False
    gold_value, pred_value = _to_float(str(gold)), _to_float(pred)
    if gold_value is None or pred_value is None:
        return pred.strip() == str(gold).strip()
    return abs(pred_value - gold_value) <= tol


def truncate_generation(text: str) -> str:
    """Cut at the first stop marker, then right after the first "answer is N" sentence if any."""
    cut = min((text.find(m) for m in STOP_MARKERS if m in text), default=len(text))
    text = text[:cut]
    match = ANSWER_SENTENCE.search(text)
    return text[: match.end()] if match else text


def generation_finished(text: str) -> bool:
    """True once ``text`` holds a stop marker or a complete "answer is N": scoring ignores anything later."""
    return any(marker in text for marker in STOP_MARKERS) or _COMPLETE_ANSWER.search(text) is not None


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials."""
    if n <= 0:
        raise ValueError(f"Wilson interval needs n >= 1, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact bounds at the edges (no rounding residue)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


@dataclass
class Prediction:
    """One scored item (``index`` is its position in the input list)."""

    index: int
    gold: str
    predicted: str | None
    correct: bool
    generation: str


@dataclass
class EvalResult:
    """Accuracy with 95% Wilson CI, cost, and (optionally) per-item predictions."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    correct: int
    seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    predictions: list[Prediction] | None = None

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_predictions:
            data.pop("predictions")
        return data


def _load_for_eval(model_dir: str | Path, adapter_dir: str | Path | None, dtype: str, device: str):
    model = load_causal_lm(model_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(check_adapter_dir(adapter_dir)), is_trainable=False)
    model.eval()
    return model, load_tokenizer(model_dir, padding_side="left")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


class _StopWhenScored:
    """Per-sequence stopping criterion: done when :func:`generation_finished` (saves time, never changes scores)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([generation_finished(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (special tokens stripped) of left-padded ``prompts``."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=_eos_ids(model, tokenizer))
    prompt_length = encoded["input_ids"].shape[1]
    stopping = StoppingCriteriaList([_StopWhenScored(tokenizer, prompt_length)])
    output = model.generate(**encoded, generation_config=config, stopping_criteria=stopping)
    continuations = output[:, prompt_length:]
    return tokenizer.batch_decode(continuations, skip_special_tokens=True)


def score_generation(index: int, generation: str, gold: str) -> Prediction:
    predicted = extract_final_number(truncate_generation(generation))
    return Prediction(index=index, gold=gold, predicted=predicted, correct=answers_match(predicted, gold),
                      generation=generation)


def evaluate(model_dir: str | Path, samples: Sequence[Sample], *, adapter_dir: str | Path | None = None,
             batch_size: int = 16, max_new_tokens: int = 64, dtype: str = "auto", device: str = "auto",
             keep_predictions: bool = True, show_progress: bool = True) -> EvalResult:
    """Exact-match accuracy (final number) of greedy generations on ``samples``."""
    if not samples:
        raise ValueError("no evaluation samples given")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    start = time.perf_counter()
    model, tokenizer = _load_for_eval(model_dir, adapter_dir, dtype, device)
    reset_cuda_peak(next(model.parameters()).device)
    prompts = [format_prompt(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: len(prompts[i]))
    predictions: list[Prediction | None] = [None] * len(samples)
    for begin in tqdm(range(0, len(order), batch_size), desc="eval", disable=not show_progress):
        indices = order[begin:begin + batch_size]
        generations = generate_batch(model, tokenizer, [prompts[i] for i in indices], max_new_tokens)
        for i, generation in zip(indices, generations, strict=True):
            predictions[i] = score_generation(i, generation, samples[i].answer)
    return _summarise([p for p in predictions if p is not None], start, model, keep_predictions)


def _summarise(predictions: list[Prediction], start: float, model, keep_predictions: bool) -> EvalResult:
    n, correct = len(predictions), sum(p.correct for p in predictions)
    low, high = wilson_interval(correct, n)
    result = EvalResult(accuracy=correct / n, ci_low=low, ci_high=high, n=n, correct=correct,
                        seconds=time.perf_counter() - start, peak_rss_mb=process_peak_rss_mb(),
                        peak_cuda_mb=cuda_peak_mb(next(model.parameters()).device),
                        predictions=predictions if keep_predictions else None)
    logger.info("accuracy %.4f (%d/%d, 95%% CI %.3f-%.3f) in %.1fs", result.accuracy, correct, n, low, high,
                result.seconds)
    return result
