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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import LorasuiteError
from .loading import BaseModel

log = logging.getLogger(__name__)


def builtin_calibration_texts() -> list[str]:
    text = resources.files("lorasuite_core.data").joinpath("calibration.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_calibration_file(path: str) -> list[str]:
    """.txt: one sample per line; .jsonl: a ``text`` field per line."""
    import json

    from .storage import read_text

    try:
        raw = read_text(path)
    except FileNotFoundError as exc:
        raise LorasuiteError(f"calibration data {path!r} does not exist") from exc
    if path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LorasuiteError(f"calibration data {path}: line {n} is not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LorasuiteError(f"calibration data {path}: line {n} has no string field 'text'")
            texts.append(record["text"])
    elif path.endswith(".txt"):
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
    else:
        raise LorasuiteError(f"calibration data {path!r}: expected a .txt or .jsonl file")
    if not texts:
        raise LorasuiteError(f"calibration data {path!r} holds no text")
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
