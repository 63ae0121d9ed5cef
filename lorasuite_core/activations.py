"""Paired residual-stream activations of two models on the same calibration text.

Each model reads every text with its own tokenizer. Positions are paired where both
tokenizations end a token at the same character offset: there both models have read exactly
the same prefix, so their states are comparable whatever the vocabularies. Special tokens
(BOS…) are fed but never paired.

For every layer l the capture keeps the state entering it and the state leaving it (hooks on
the decoder blocks, so no final norm is mixed in):

    states[0] = input of layer 0,  states[l + 1] = output of layer l       (L + 1) × N × d
    updates[l] = states[l + 1] − states[l]     what layer l adds to the residual stream

An inserted identity layer has a zero update; comparing updates, not only states, is what
lets the layer mapping tell it apart from the layer that does the work.

Calibration files (:func:`read_calibration_file`) are streamed, never read whole, and only as
much text as a token budget ``B`` (``max_calibration_tokens``) can use is kept:

* each text is tokenised to at most ``T = MAX_TOKENS_PER_TEXT`` (256) tokens, so a sample is
  cut to its first ``cap = CHARS_PER_TOKEN · max(B, T)`` characters (8 characters per token,
  generous: English BPE averages about 4); the rest of a longer line is read and dropped in
  bounded pieces (``TextIOWrapper.readline(limit)``), never held whole;
* a text of ``n`` characters gives at most ``min(n, T)`` paired positions, so reading stops
  once the kept texts reach ``Σ min(n_i, T) >= CHARS_PER_TOKEN · B``: with at most 8
  characters per paired position they already hold the ``B`` positions the stage pairs.
  Memory is then O(cap · CHARS_PER_TOKEN · B / T) characters whatever the file's size;
* ``.txt``: one sample per line (``str.splitlines`` breaks, stripped, blank lines skipped);
  ``.jsonl``: a JSON object with a string field ``text`` per line (blank texts skipped); the
  text is capped like a ``.txt`` line, but a JSON line longer than ``JSONL_LINE_FACTOR · cap`` characters is refused
  with an error naming it (a truncated JSON line cannot be parsed);
* the same file and budget always give the same texts, so ``texts_identity`` of the result
  (part of the activations cache key) depends only on the text that is used;
* not UTF-8, NUL bytes (a binary file), a directory, a missing file: one-line LorasuiteError
  naming the file.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import LorasuiteError
from .loading import BaseModel

log = logging.getLogger(__name__)


def builtin_calibration_texts() -> list[str]:
    text = resources.files("lorasuite_core.data").joinpath("calibration.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


CHARS_PER_TOKEN = 8
MAX_TOKENS_PER_TEXT = 256
JSONL_LINE_FACTOR = 64
DEFAULT_CALIBRATION_TOKENS = 2048
_SKIP_PIECE = 1 << 16


def calibration_text_cap(max_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> int:
    """Characters kept of one calibration sample for a budget of ``max_tokens`` paired positions."""
    return CHARS_PER_TOKEN * max(max_tokens, MAX_TOKENS_PER_TEXT)


def _refuse_nul(text: str, what: str) -> None:
    if "\0" in text:
        raise LorasuiteError(f"{what} holds NUL bytes: a binary file, not text")


def _lines(handle, limit: int, what: str) -> Iterator[tuple[int, str, bool]]:
    """``(number, first <= limit characters, whole line?)`` per line; a longer line's tail is skipped in pieces."""
    for number in itertools.count(1):
        line = handle.readline(limit)
        if not line:
            return
        _refuse_nul(line, what)
        skipped = 0
        if not line.endswith("\n") and len(line) == limit:
            while True:
                piece = handle.readline(_SKIP_PIECE)
                _refuse_nul(piece, what)
                skipped += len(piece.rstrip("\n"))
                if not piece or piece.endswith("\n") or len(piece) < _SKIP_PIECE:
                    break
        yield number, line, skipped == 0


def _calibration_texts(handle, path: str, cap: int) -> Iterator[str]:
    what = f"calibration data {path!r}"
    if path.endswith(".txt"):
        for _number, line, _whole in _lines(handle, cap, what):
            for part in line.splitlines():
                if part.strip():
                    yield part.strip()
        return
    limit = JSONL_LINE_FACTOR * cap
    for number, line, whole in _lines(handle, limit, what):
        if not whole:
            raise LorasuiteError(f"{what}: line {number} is longer than {limit} characters; split it into shorter "
                                 f"records (long lines of a .txt file are cut, not refused)")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorasuiteError(f"{what}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LorasuiteError(f"{what}: line {number} has no string field 'text'")
        if record["text"].strip():
            yield record["text"][:cap]


def read_calibration_file(path: str, max_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> list[str]:
    """.txt: one sample per line; .jsonl: a ``text`` field per line; streamed and capped for ``max_tokens``.

    See the module docstring: samples are cut to :func:`calibration_text_cap` characters and
    reading stops once the texts can give ``max_tokens`` paired positions.
    """
    from . import storage

    shown = storage.redact_uri(str(path))
    if not str(path).endswith((".txt", ".jsonl")):
        raise LorasuiteError(f"calibration data {shown!r}: expected a .txt or .jsonl file")
    cap = calibration_text_cap(max_tokens)
    wanted = CHARS_PER_TOKEN * max_tokens
    texts: list[str] = []
    try:
        fs, location = storage.resolve(path)
        if fs.isdir(location):
            raise LorasuiteError(f"calibration data {shown!r} is a directory, not a .txt or .jsonl file")
        with fs.open(location, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="strict") as handle:
            collected = 0
            for text in _calibration_texts(handle, shown, cap):
                texts.append(text)
                collected += min(len(text), MAX_TOKENS_PER_TEXT)
                if collected >= wanted:
                    break
    except FileNotFoundError:
        raise LorasuiteError(f"calibration data {shown!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise LorasuiteError(f"calibration data {shown!r} is not UTF-8 text ({exc.reason}): "
                             f"a binary file?") from None
    except IsADirectoryError:
        raise LorasuiteError(f"calibration data {shown!r} is a directory, not a .txt or .jsonl file") from None
    except (LorasuiteError, KeyboardInterrupt):
        raise
    except OSError as exc:
        raise LorasuiteError(f"calibration data {shown!r} cannot be read: {storage.describe_error(exc)}") from None
    if not texts:
        raise LorasuiteError(f"calibration data {shown!r} holds no text")
    return texts


@dataclass
class PairedActivations:
    old_states: np.ndarray   # (L_old + 1) × N × d, float32
    new_states: np.ndarray   # (L_new + 1) × N × D, float32
    num_texts: int

    @property
    def num_tokens(self) -> int:
        return self.old_states.shape[1]

    @staticmethod
    def updates(states: np.ndarray) -> np.ndarray:
        return states[1:] - states[:-1]


def _token_ends(tokenizer, text: str, max_tokens: int) -> tuple[list[int], dict[int, int]]:
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_tokens)
    ends = {}
    for pos, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and enc["input_ids"][pos] not in tokenizer.all_special_ids:
            ends[end] = pos  # the last token ending at a character wins
    return enc["input_ids"], ends


def _decoder_layers(model, base: BaseModel):
    container = base.family.layer_prefix.split("{layer}")[0].rstrip(".")
    try:
        return model.get_submodule(container)
    except AttributeError as exc:
        raise LorasuiteError(f"model {base.source}: no module {container!r} holding the decoder layers") from exc


@torch.no_grad()
def _layer_states(model, base: BaseModel, batch: list[list[int]]) -> list[torch.Tensor]:
    """Right-padded batch through the decoder stack only (no LM head): per text (L + 1) × T × d."""
    layers = _decoder_layers(model, base)
    captured: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post_hook(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(post_hook) for layer in layers]
    try:
        # causal attention: right padding leaves every real position's state unchanged
        model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    states = torch.stack(captured).float()                      # (L + 1) × B × T × d
    return [states[:, row, : len(ids)] for row, ids in enumerate(batch)]


def _paired_texts(old_tok, new_tok, texts, max_tokens: int, max_tokens_per_text: int):
    """Tokenise both sides and keep texts until ``max_tokens`` positions are paired."""
    pairs, total = [], 0
    for text in texts:
        old_ids, old_ends = _token_ends(old_tok, text, max_tokens_per_text)
        new_ids, new_ends = _token_ends(new_tok, text, max_tokens_per_text)
        common = sorted(set(old_ends) & set(new_ends))
        if common:
            pairs.append((old_ids, [old_ends[c] for c in common], new_ids, [new_ends[c] for c in common]))
            total += len(common)
        if total >= max_tokens:
            break
    return pairs, total


def paired_activations(
    old: BaseModel,
    new: BaseModel,
    texts: list[str],
    *,
    max_tokens: int = 2048,
    max_tokens_per_text: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> PairedActivations:
    pairs, total = _paired_texts(old.tokenizer(), new.tokenizer(), texts, max_tokens, max_tokens_per_text)
    if total < 8:
        raise LorasuiteError(f"calibration text yields only {total} paired token positions; give more text")
    old_model, new_model = old.load_torch_model(), new.load_torch_model()
    old_chunks, new_chunks = [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="activations", unit="batch", disable=not progress):
        chunk = pairs[start:start + batch_size]
        old_states = _layer_states(old_model, old, [p[0] for p in chunk])
        new_states = _layer_states(new_model, new, [p[2] for p in chunk])
        for (_, old_pos, _, new_pos), o, n in zip(chunk, old_states, new_states):
            old_chunks.append(o[:, old_pos])
            new_chunks.append(n[:, new_pos])
    log.info("paired %d token positions from %d texts", total, len(pairs))
    return PairedActivations(
        old_states=torch.cat(old_chunks, dim=1)[:, :max_tokens].numpy(),
        new_states=torch.cat(new_chunks, dim=1)[:, :max_tokens].numpy(),
        num_texts=len(pairs),
    )
