"""Accuracy of a base model (optionally + LoRA adapter) on a task's samples (arithmetic by default).

Design
------
* Prompts come from :func:`lorasuite_core.training.task_data.format_prompt`, the same
  function training uses, so a trained adapter sees exactly its training prompt.
* Generation is greedy, by :func:`greedy_generate` (a reusable loop over the model's own
  ``forward``, not ``model.generate``):

  1. every prompt is tokenised alone; prompts are sorted by *token* length (stable) and cut
     into batches of ``batch_size``, so a batch holds prompts of nearly equal length and the
     left padding is a few tokens; results are put back in input order;
  2. prefill: one forward over the left-padded batch with an explicit attention mask and
     ``position_ids = cumsum(mask) - 1`` (every row's real tokens get positions 0..L-1, as
     unpadded), a fresh ``DynamicCache`` (the KV cache) and ``logits_to_keep=1`` (only the
     last position's logits: the vocabulary projection is not paid for prompt tokens);
  3. decode: one token per active row per forward (``argmax`` of the last logits), fed back
     with the cache; a row *finishes* at an EOS id, at ``max_new_tokens``, or when
     ``stop(text)`` says so (evaluation uses :func:`generation_finished`: a stop marker or a
     complete "The answer is N" appeared, after which nothing can change the score);
  4. finished rows leave the batch at once: the cache, mask and positions are cut to the
     active rows (``DynamicCache.batch_select_indices``), so a finished row costs nothing
     more, and the batch ends when its last row finishes.

  The continuation text is the decoded generated tokens (special tokens skipped), the token
  that triggered the stop included and the EOS excluded -- what ``model.generate`` with a
  per-sequence stopping criterion returned before (:func:`generate_batch` keeps that
  signature). Everything runs under ``torch.inference_mode``.
* Cost model: per generated token the model does ~2 FLOP per parameter (the prefill the same
  per prompt token, less the vocabulary projection). On a CPU a decode step reads every
  weight once whatever the batch, so below ~32 rows its time is memory bound and nearly flat
  in the batch size; larger batches amortise the weights (hence :func:`evaluate` batches 64
  prompts by default), early stopping removes steps.
* dtype: ``dtype="auto"`` (:func:`eval_dtype`) is bfloat16 on a CPU whose instruction set has
  bf16 matrix support (AVX512-BF16 or AMX, reported by ``torch.cpu``, else ``/proc/cpuinfo``)
  and on bf16-capable CUDA, float32 otherwise; ``"float32"``/``"bfloat16"`` force one. Only
  evaluation does this: training and the exactness-sensitive transfer paths stay float32.
  bf16 changes greedy outputs a little (ties and near-ties), not accuracies beyond their
  95% interval (benchmarks/EVAL_THROUGHPUT.md measures it on Qwen2.5-Coder-1.5B).
* Skills: each sample is scored by its skill's scorer (``Sample.task``, the registry of
  :mod:`lorasuite_core.training.skills`), generated with that skill's stop rule and token budget;
  a sample without a task (a user's math_10k file, ``builtin:``) is arithmetic, scored as below.
* Scoring (arithmetic): the generation is first cut at the first stop marker (a new
  ``### Instruction`` block, ...) and right after the first ``"The answer is N"``
  sentence, so text a base model rambles on with afterwards cannot change the
  score; then :func:`extract_final_number` takes the *last* number left
  (commas, ``$`` and trailing periods tolerated) and :func:`answers_match`
  compares it numerically with the gold answer (absolute tolerance 1e-4).
* :class:`EvalResult` reports accuracy with a 95% Wilson score interval
  (:func:`wilson_interval`), timing and memory (process peak RSS, the OS
  high-water mark, and on CUDA ``torch.cuda.max_memory_allocated`` for the call),
  the dtype used and the generation counters (:class:`GenerationStats`).

Models and adapters are read from safetensors only; ``trust_remote_code`` is False.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from lorasuite_core.training.config import EvalConfig
from lorasuite_core.training.task_data import Sample, format_prompt
from lorasuite_core.training.devices import (cpu_supports_bf16, cuda_peak_mb, process_peak_rss_mb, reset_cuda_peak,
                                             resolve_device, resolve_dtype)
from lorasuite_core.training.train import check_adapter_dir, load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)
EVAL = EvalConfig()   # the defaults of an evaluation, declared once
#: A next-token rule: the last position's logits (rows x vocabulary) -> one token id per row.
Pick = Callable[[torch.Tensor], torch.Tensor]

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
    dtype: str | None = None  # the model's dtype during generation
    batch_size: int | None = None
    generation: dict[str, Any] | None = None  # GenerationStats of the run, as a dict

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_predictions:
            data.pop("predictions")
        return data


def eval_dtype(dtype: str, device: torch.device) -> str:
    """Evaluation's dtype name: "auto" -> bfloat16 on a bf16-capable CPU or CUDA device, else float32."""
    if dtype != "auto":
        resolve_dtype(dtype, device)  # validates the name
        return dtype
    if device.type == "cpu":
        return "bfloat16" if cpu_supports_bf16() else "float32"
    return str(resolve_dtype("auto", device)).replace("torch.", "")


def load_adapters_for_generation(model_dir: str | Path, adapters: dict[str, str | Path], *, dtype: str = "auto",
                                 device: str = "auto"):
    """``(model, tokenizer)``: one base model holding every adapter of ``adapters`` (name -> directory) under its
    name, frozen, for mixed-adapter generation (:func:`greedy_generate_ids` with ``adapter_names``)."""
    if not adapters:
        raise ValueError("no adapters given")
    names = list(adapters)
    model, tokenizer = load_for_generation(model_dir, adapters[names[0]], dtype=dtype, device=device,
                                           adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(check_adapter_dir(adapters[name])), adapter_name=name, is_trainable=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def load_for_generation(model_dir: str | Path, adapter_dir: str | Path | None = None, *, dtype: str = "auto",
                        device: str = "auto", adapter_name: str = "default"):
    """``(model, tokenizer)`` for generation: a base model (+ adapter, kept a PEFT adapter, not merged: merging
    into bf16 weights would round small deltas away), frozen, eval mode, left padding. ``dtype`` as
    :func:`~lorasuite_core.training.train.load_causal_lm` takes it."""
    model = load_causal_lm(model_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(check_adapter_dir(adapter_dir)), is_trainable=False,
                                          adapter_name=adapter_name)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, load_tokenizer(model_dir, padding_side="left")


def _load_for_eval(model_dir: str | Path, adapter_dir: str | Path | None, dtype: str, device: str):
    """:func:`load_for_generation` in the evaluation dtype (:func:`eval_dtype`)."""
    return load_for_generation(model_dir, adapter_dir, dtype=eval_dtype(dtype, resolve_device(device)), device=device)


def model_eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS id and the generation config's (one or several), sorted."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@dataclass
class GenerationStats:
    """Counters of :func:`greedy_generate` (accumulated over calls when the same object is passed again)."""

    batches: int = 0
    forward_passes: int = 0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens prefilled
    padded_prompt_tokens: int = 0  # prompt positions prefilled, padding included
    generated_tokens: int = 0  # tokens emitted (EOS included), summed over rows
    row_steps: int = 0  # rows fed through decode forwards, summed over steps
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def _forward_options(model) -> tuple[str, dict[str, int]]:
    """The (base) model's name for the KV-cache argument (``cache``, formerly ``past_key_values``) and
    ``logits_to_keep=1`` where its forward takes it (no vocabulary projection of prompt tokens)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return ("cache" if "cache" in parameters else "past_key_values"), extra


@contextlib.contextmanager
def _contiguous_head_input(model):
    """Hand the output projection a contiguous input while generating.

    With ``logits_to_keep=1`` the head sees ``hidden[:, -1:]``, a strided view; for some models (seen on
    Gemma-3-270M with a merged or PEFT adapter) ``matmul`` then takes its batched path and expands the
    262k x 640 head weight once per row: 5 GB and 4x the time of a 16-prompt prefill (torch profiler:
    aten::bmm + clone). A contiguous input keeps it one plain GEMM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def _greedy_batch(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                  stop: Callable[[str], bool] | None, eos_ids: Sequence[int], stats: GenerationStats,
                  adapter_names: Sequence[str] | None = None, pick: Pick | None = None) -> list[list[int]]:
    """Greedy continuations of one batch; finished rows are dropped from the batch (and its KV cache).

    ``adapter_names`` (one per row): PEFT's mixed-adapter batch, each row through its own adapter.  ``pick``: the
    next tokens from the last position's logits (rows x vocabulary), default their argmax (a sampler: see
    :mod:`~lorasuite_core.training.consistency`)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids, mask = _left_pad(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    cache_name, extra = _forward_options(model)
    generated: list[list[int]] = [[] for _ in prompt_ids]
    active = list(range(len(prompt_ids)))  # batch row -> prompt index
    stats.batches += 1
    stats.prompt_tokens += int(mask.sum())
    stats.padded_prompt_tokens += int(mask.numel())
    cache, step_input, started = None, input_ids, time.perf_counter()
    for step in range(max_new_tokens):
        if adapter_names is not None:
            extra["adapter_names"] = [adapter_names[index] for index in active]
        out = model(input_ids=step_input, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_name: cache}, **extra)
        cache = out.cache if cache_name == "cache" else out.past_key_values
        tokens = out.logits[:, -1].argmax(-1) if pick is None else pick(out.logits[:, -1])
        stats.forward_passes += 1
        if step == 0:
            stats.prefill_seconds += time.perf_counter() - started
        else:
            stats.row_steps += len(active)
        is_eos = torch.isin(tokens, eos).tolist()
        for row, index in enumerate(active):
            generated[index].append(int(tokens[row]))
        stats.generated_tokens += len(active)
        done = list(is_eos)
        if stop is not None:
            pending = [row for row in range(len(active)) if not done[row]]
            texts = tokenizer.batch_decode([generated[active[row]] for row in pending], skip_special_tokens=True)
            for row, text in zip(pending, texts, strict=True):
                done[row] = bool(stop(text))
        keep = [row for row in range(len(active)) if not done[row]]
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            kept = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(kept)
            mask, positions, tokens = mask[kept], positions[kept], tokens[kept]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions[:, -1:] + 1
        step_input = tokens[:, None]
    stats.decode_seconds += time.perf_counter() - started
    return generated


def greedy_generate_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                        stop: Callable[[str], bool] | None = None, eos_token_ids: Sequence[int] | None = None,
                        stats: GenerationStats | None = None, show_progress: bool = False,
                        adapter_names: Sequence[str] | None = None, pick: Pick | None = None) -> list[list[int]]:
    """Generated token ids per prompt, in input order (a final EOS id included); see :func:`greedy_generate`.

    ``adapter_names``: one PEFT adapter name per prompt ("__base__": none) for a model holding several adapters;
    rows of different adapters share batches (PEFT's mixed-adapter batches), so one pass over the base weights
    serves every adapter.  ``pick``: the next-token rule of :func:`_greedy_batch` (default argmax)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    stats = stats if stats is not None else GenerationStats()
    eos_ids = list(eos_token_ids) if eos_token_ids is not None else model_eos_ids(model, tokenizer)
    if not eos_ids:
        raise ValueError("greedy generation needs at least one EOS token id")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode(), _contiguous_head_input(model):
        for begin in tqdm(range(0, len(order), batch_size), desc="generate", disable=not show_progress):
            indices = order[begin:begin + batch_size]
            generated = _greedy_batch(model, tokenizer, [encoded[i] for i in indices], max_new_tokens, stop, eos_ids,
                                      stats, None if adapter_names is None else [adapter_names[i] for i in indices],
                                      pick)
            for i, ids in zip(indices, generated, strict=True):
                results[i] = ids
    return results


def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
                    stop: Callable[[str], bool] | None = None, eos_token_ids: Sequence[int] | None = None,
                    stats: GenerationStats | None = None, show_progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens stripped), in input order.

    Prompts are sorted by token length and batched; a row stops at an EOS id (``eos_token_ids``,
    default: the tokenizer's and the generation config's), at ``max_new_tokens``, or once
    ``stop(continuation_text)`` is true; finished rows leave their batch. ``stats`` (optional)
    accumulates the counters of :class:`GenerationStats`. ``model`` may be a PEFT model.
    """
    ids = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              stop=stop, eos_token_ids=eos_token_ids, stats=stats, show_progress=show_progress)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations (special tokens stripped) of ``prompts`` as one batch, each stopped once scored."""
    return greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           batch_size=max(1, len(prompts)), stop=generation_finished)


def score_generation(index: int, generation: str, gold: str) -> Prediction:
    predicted = extract_final_number(truncate_generation(generation))
    return Prediction(index=index, gold=gold, predicted=predicted, correct=answers_match(predicted, gold),
                      generation=generation)


def evaluate(model_dir: str | Path, samples: Sequence[Sample], *, adapter_dir: str | Path | None = None,
             batch_size: int = EVAL.batch_size, max_new_tokens: int | None = EVAL.max_new_tokens, dtype: str = EVAL.dtype,
             device: str = EVAL.device,
             keep_predictions: bool = True, show_progress: bool = True) -> EvalResult:
    """Accuracy of greedy generations on ``samples``, each scored by its skill (``Sample.task``; none: the
    final number, :func:`score_generation`), generated with the skill's stop rule and, unless
    ``max_new_tokens`` is given, its token budget (``dtype``: see :func:`eval_dtype`)."""
    from lorasuite_core.training.skills import skill_of

    if not samples:
        raise ValueError("no evaluation samples given")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(skill_of(sample).name, []).append(index)
    start = time.perf_counter()
    model, tokenizer = _load_for_eval(model_dir, adapter_dir, dtype, device)
    reset_cuda_peak(next(model.parameters()).device)
    stats = GenerationStats()
    predictions: list[Prediction | None] = [None] * len(samples)
    for indices in groups.values():   # one pass per skill: its stop rule, budget and scorer
        skill = skill_of(samples[indices[0]])
        generations = greedy_generate(model, tokenizer, [format_prompt(samples[i]) for i in indices],
                                      max_new_tokens=max_new_tokens or skill.max_new_tokens, batch_size=batch_size,
                                      stop=skill.finished, stats=stats, show_progress=show_progress)
        for i, generation in zip(indices, generations, strict=True):
            predictions[i] = skill.score(i, generation, samples[i])
    result = _summarise(predictions, start, model, keep_predictions)  # type: ignore[arg-type]
    result.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    result.batch_size, result.generation = batch_size, asdict(stats)
    return result


def _summarise(predictions: list[Prediction], start: float, model, keep_predictions: bool) -> EvalResult:
    n, correct = len(predictions), sum(p.correct for p in predictions)
    low, high = wilson_interval(correct, n)
    result = EvalResult(accuracy=correct / n, ci_low=low, ci_high=high, n=n, correct=correct,
                        seconds=time.perf_counter() - start, peak_rss_mb=process_peak_rss_mb(),
                        peak_cuda_mb=cuda_peak_mb(next(model.parameters()).device),
                        predictions=predictions if keep_predictions else None)
    logger.debug("accuracy %.4f (%d/%d, 95%% CI %.3f-%.3f) in %.1fs", result.accuracy, correct, n, low, high,
                result.seconds)
    return result
