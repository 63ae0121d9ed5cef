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

The forward passes are streamed layer by layer (:func:`streamed_states`), one model after the
other, so memory does not grow with depth: the model is built on the meta device (no weights),
only what lies outside the decoder layers (embeddings, final norm, rotary tables, embedding
scales) is made real (of the input embedding only the rows of the token ids the texts use, read
alone from the checkpoint, and the ids renumbered to match: the full table is 0.9 GB in float32
at Qwen2.5-1.5B), and the model's own forward runs with every decoder layer replaced by a
stand-in that records what it is called with: per batch the state entering layer 0 and each
layer's other arguments (causal / sliding-window masks, rotary cos/sin, position ids). The
embeddings are then freed and for l = 0 … L − 1::

    load layer l's tensors (lazy safe_open) → h_b ← layer_l(h_b, args_b,l) for every batch b
    → keep states[l + 1] at the paired positions → free layer l

Batches: each model's texts are sorted by their token count and cut into batches of at most
``batch_size`` texts and ``batch_tokens`` padded tokens, so texts of like length share a batch:
on the built-in calibration text at Qwen2.5 (80 texts of 5-30 tokens) the forward multiplies
1,480 padded rows instead of the 1,992 of batches of eight in file order (the work is linear
in them), in fewer, taller matrix products. The kept states are put back in text order, so the
result does not depend on the batching (beyond float rounding of the products' shapes).

Compute dtype: by default every product is float32.  With ``compute_dtype=torch.bfloat16`` the
layers run under ``torch.autocast`` (bf16 matrix products, float32 accumulation; the residual stream
and the kept states stay float32), about twice as fast on CPUs with AVX512-BF16 and more with AMX.
The pipeline asks for it only where the states feed nothing but CKA, a ranking (``transfer_fit
weights``); the activation fit (:mod:`.activation_fit`) needs float32 states, exact under
function-preserving upgrades.

Memory: one layer's weights + the carried states (padded tokens × d) + the kept states
(L + 1) × N × d, instead of both whole models. The operations are the ones the whole model runs,
in the same order and float32, so the states equal :func:`_layer_states`'s (the tests check
llama, qwen2, gemma3, gpt_neox and bloom to 1e-5). A model type outside ``STREAMED_MODEL_TYPES``, or a
checkpoint the skeleton cannot be filled from, falls back to the whole model in float32 (logged
with the reason); that path too loads one model at a time.

Calibration files (:func:`read_calibration_file`) are streamed, never read whole, and only as
much text as a token budget ``B`` (a parameter: the options' ``max_calibration_tokens``) can use is kept:

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

import contextlib

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.io import textfile
from lorasuite_core.models.loading import LoadedModel

log = logging.getLogger(__name__)


def builtin_calibration_texts() -> list[str]:
    text = resources.files("lorasuite_core.transfer.data").joinpath("calibration.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


CHARS_PER_TOKEN = 8
MAX_TOKENS_PER_TEXT = 256
JSONL_LINE_FACTOR = 64


def calibration_text_cap(max_tokens: int) -> int:
    """Characters kept of one calibration sample for a budget of ``max_tokens`` paired positions."""
    return CHARS_PER_TOKEN * max(max_tokens, MAX_TOKENS_PER_TEXT)


def _calibration_texts(handle, what: str, txt: bool, cap: int) -> Iterator[str]:
    if txt:
        for _number, line, _whole in textfile.lines(handle, cap, what):   # a long line is cut, not refused
            for part in line.splitlines():
                if part.strip():
                    yield part.strip()
        return
    for number, record in textfile.jsonl_records(handle, JSONL_LINE_FACTOR * cap, what):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LorasuiteError(f"{what}: line {number} has no string field 'text'")
        if record["text"].strip():
            yield record["text"][:cap]


def read_calibration_file(path: str, max_tokens: int) -> list[str]:
    """.txt: one sample per line; .jsonl: a ``text`` field per line; streamed and capped for ``max_tokens``.

    See the module docstring: samples are cut to :func:`calibration_text_cap` characters and
    reading stops once the texts can give ``max_tokens`` paired positions.
    """
    from lorasuite_core.io.uris import redact_uri

    what = f"calibration data {redact_uri(str(path))!r}"
    if not str(path).endswith((".txt", ".jsonl")):
        raise LorasuiteError(f"{what}: expected a .txt or .jsonl file")
    cap = calibration_text_cap(max_tokens)
    wanted = CHARS_PER_TOKEN * max_tokens
    texts: list[str] = []
    with textfile.open_text(path, what) as handle:
        collected = 0
        for text in _calibration_texts(handle, what, str(path).endswith(".txt"), cap):
            texts.append(text)
            collected += min(len(text), MAX_TOKENS_PER_TEXT)
            if collected >= wanted:
                break
    if not texts:
        raise LorasuiteError(f"{what} holds no text")
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


def _decoder_layers(model, base: LoadedModel):
    container = base.family.layer_prefix.split("{layer}")[0].rstrip(".")
    try:
        return model.get_submodule(container)
    except AttributeError as exc:
        raise LorasuiteError(f"model {base.source}: no module {container!r} holding the decoder layers") from exc


def _padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (causal attention: padding leaves real positions unchanged)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


@torch.no_grad()
def _layer_states(model, base: LoadedModel, batch: list[list[int]]) -> list[torch.Tensor]:
    """Right-padded batch through the decoder stack only (no LM head): per text (L + 1) × T × d."""
    layers = _decoder_layers(model, base)
    captured: list[torch.Tensor] = []

    def pre_hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    def post_hook(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    input_ids, mask = _padded(batch)
    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(post_hook) for layer in layers]
    try:
        model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    states = torch.stack([c.float() for c in captured])         # (L + 1) × B × T × d
    return [states[:, row, : len(ids)] for row, ids in enumerate(batch)]


# ----------------------------------------------------------------------------- streamed forward

STREAMED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text", "gpt_neox", "bloom")


class StreamUnsupported(Exception):
    """The streamed forward cannot run this model; :func:`model_states` uses the whole model instead."""


class _AllLayersSeen(Exception):
    """Raised by the last stand-in: every layer's inputs are recorded, the rest of the forward is not needed."""


class _LayerInputs(nn.Module):
    """Stands in for decoder layer ``index`` while the model's own forward prepares the layers' inputs.

    It hands its input on as a 1-tuple, which a model that takes ``output[0]`` of a layer (BLOOM)
    unpacks and one that takes the output whole passes to the next stand-in as is; only layer 0's
    input and every layer's other arguments -- masks, rotary tables, ALiBi biases, computed before
    the layer loop -- are kept. The last stand-in stops the forward."""

    def __init__(self, index: int, calls: list, last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((self.index, hidden_states, args, kwargs))
        if self.last:
            raise _AllLayersSeen
        return (hidden_states,)


def _checkpoint_tensors(base: LoadedModel, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    missing = [n for n in names if prefix + n not in base.weights]
    if missing:
        raise StreamUnsupported(f"the checkpoint has no {prefix + missing[0]}")
    return {n: base.weights.get(prefix + n).to(torch.float32) for n in names}


def _skeleton(base: LoadedModel, token_ids: torch.Tensor | None = None):
    """The model built on the meta device (no weights); everything outside the decoder layers made real.

    ``token_ids`` (sorted, distinct): the input embedding holds only those rows (row i is token
    ``token_ids[i]``, so the ids fed must be renumbered), read alone from the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = base.config.get("model_type")
    if model_type not in STREAMED_MODEL_TYPES:
        raise StreamUnsupported(f"model_type {model_type!r} is not one the streamed forward knows "
                                f"({', '.join(STREAMED_MODEL_TYPES)})")
    try:
        config = AutoConfig.from_pretrained(base.local_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the whole-model path reports real loading errors
        raise StreamUnsupported(f"no meta skeleton ({type(exc).__name__}: {exc})") from exc
    model.eval()
    layers = _decoder_layers(model, base)
    body = model.base_model
    body_path = next(name for name, module in model.named_modules() if module is body)
    container = base.family.layer_prefix.split("{layer}")[0].rstrip(".")
    inside = (container[len(body_path) + 1:] if body_path else container) + "."
    in_layers = {id(m) for m in layers.modules()}
    for module in body.modules():   # non-persistent buffers (rotary frequencies, embedding scales): own init
        if id(module) not in in_layers and any(b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    prefix = f"{body_path}." if body_path else ""
    names = [n for n, _ in body.named_parameters() if not n.startswith(inside)]
    if token_ids is not None:            # the caller renumbers the ids it feeds: the rows must be these or none
        try:
            embedding = body.get_input_embeddings()
        except (AttributeError, NotImplementedError) as exc:
            raise StreamUnsupported(f"no input embedding module ({type(exc).__name__}: {exc})") from exc
        weight = getattr(embedding, "weight", None)
        name = next((n for n, p in body.named_parameters() if weight is not None and p is weight), None)
        if name is None or prefix + name not in base.weights:
            raise StreamUnsupported("the input embedding is not a checkpoint tensor of the body")
        names.remove(name)
        rows = base.weights.get(prefix + name, token_ids).to(torch.float32)
        embedding.weight = nn.Parameter(rows, requires_grad=False)
        embedding.num_embeddings, embedding.padding_idx = len(token_ids), None
    body.load_state_dict(_checkpoint_tensors(base, prefix, names), strict=False, assign=True)
    left = [n for n, t in [*body.named_parameters(), *body.named_buffers()] if t.is_meta and not n.startswith(inside)]
    if left:
        raise StreamUnsupported(f"no value for {left[0]} outside the decoder layers")
    return body, layers


def _load_layer(base: LoadedModel, layer: nn.Module, index: int) -> None:
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    layer.load_state_dict(_checkpoint_tensors(base, base.family.layer_prefix.format(layer=index), names),
                          strict=True, assign=True)


def _layer_inputs(body, layers, batches: list[list[list[int]]]) -> list[tuple[torch.Tensor, list]]:
    """Per batch: the state entering layer 0 and each layer's other arguments (masks, rotary tables…),
    made by the model's own forward with every decoder layer a stand-in."""
    real, calls, prepared = list(layers), [], []
    for i in range(len(real)):
        layers[i] = _LayerInputs(i, calls, last=i == len(real) - 1)
    try:
        for batch in batches:
            calls.clear()
            input_ids, mask = _padded(batch)
            with contextlib.suppress(_AllLayersSeen):
                body(input_ids=input_ids, attention_mask=mask, use_cache=False)
            if [c[0] for c in calls] != list(range(len(real))):
                raise StreamUnsupported("the model's forward does not call each decoder layer once, in order")
            prepared.append((calls[0][1], [(c[2], c[3]) for c in calls]))
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    return prepared


def _compute(dtype: torch.dtype | None):
    """Autocast to ``dtype`` on the CPU (None: float32 as stored, no autocast)."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def streamed_states(base: LoadedModel, batches: list[list[list[int]]], positions: list[list[int]], *,
                    progress: bool = False, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """States at ``positions`` (per text, texts in batch order) with one decoder layer in memory at a time.

    Returns (L + 1) × N × d float32, N = Σ len(positions[k]), the texts' kept positions in order —
    the same states :func:`_layer_states` captures from the whole model.
    """
    # the embedding table holds only the rows these texts use (and 0, the padding): 151,936 × 1,536 float32 is
    # 0.9 GB at Qwen2.5-1.5B; its rows are renumbered 0 … n − 1 in id order, the ids fed likewise
    used = sorted({0, *(t for batch in batches for ids in batch for t in ids)})
    body, layers = _skeleton(base, torch.tensor(used, dtype=torch.long))
    local = {t: i for i, t in enumerate(used)}
    prepared = _layer_inputs(body, layers, [[[local[t] for t in ids] for ids in batch] for batch in batches])
    for module in body.children():          # embeddings, final norm: no longer needed
        if module is not layers:
            module.to("meta")
    picks, offset, text = [], 0, 0
    for batch in batches:
        rows = [row for row in range(len(batch)) for _ in positions[text + row]]
        cols = [p for row in range(len(batch)) for p in positions[text + row]]
        picks.append((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long),
                      slice(offset, offset + len(rows))))
        offset, text = offset + len(rows), text + len(batch)
    hidden = [h for h, _ in prepared]
    out = torch.empty(len(layers) + 1, offset, hidden[0].shape[-1], dtype=torch.float32)
    for h, (rows, cols, span) in zip(hidden, picks):
        out[0, span] = h[rows, cols].float()
    for i in tqdm(range(len(layers)), desc=f"activations {base.family.name}", unit="layer", disable=not progress):
        layer = layers[i]
        _load_layer(base, layer, i)
        for b, (rows, cols, span) in enumerate(picks):
            args, kwargs = prepared[b][1][i]
            with _compute(compute_dtype):
                result = layer(hidden[b], *args, **kwargs)
            hidden[b] = (result[0] if isinstance(result, tuple) else result).float()   # residual stream in fp32
            out[i + 1, span] = hidden[b][rows, cols].float()
        layer.to("meta")                   # frees this layer's weights
    return out


def whole_model_states(base: LoadedModel, batches: list[list[list[int]]], positions: list[list[int]], *,
                       progress: bool = False, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same states as :func:`streamed_states`, from the whole model loaded in float32."""
    model = base.load_torch_model()
    chunks, text = [], 0
    for batch in tqdm(batches, desc=f"activations {base.family.name}", unit="batch", disable=not progress):
        with _compute(compute_dtype):
            batch_states = _layer_states(model, base, batch)
        for states in batch_states:
            chunks.append(states[:, positions[text]])
            text += 1
    return torch.cat(chunks, dim=1)


def model_states(base: LoadedModel, batches: list[list[list[int]]], positions: list[list[int]], *,
                 progress: bool = False, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Streamed states where the family and checkpoint allow it, else the whole model (logged)."""
    try:
        return streamed_states(base, batches, positions, progress=progress, compute_dtype=compute_dtype)
    except StreamUnsupported as exc:
        log.info("activations of %s: whole-model forward, not streamed: %s", base.source, exc)
    return whole_model_states(base, batches, positions, progress=progress, compute_dtype=compute_dtype)


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


def length_batches(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Text indices sorted by length (stable), cut into batches of at most ``batch_size`` texts whose
    padded size (texts × longest) stays within ``batch_tokens`` (a longer text alone is one batch)."""
    batches: list[list[int]] = []
    for t in sorted(range(len(lengths)), key=lambda t: lengths[t]):
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (len(current) + 1) * lengths[t] <= batch_tokens:
            current.append(t)
        else:
            batches.append([t])
    return batches


def _sorted_states(base: LoadedModel, ids: list[list[int]], positions: list[list[int]], batch_size: int,
                   batch_tokens: int, progress: bool, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`model_states` of length-sorted batches, kept positions returned in text order."""
    batches = length_batches([len(x) for x in ids], batch_size, batch_tokens)
    order = [t for batch in batches for t in batch]
    states = model_states(base, [[ids[t] for t in batch] for batch in batches], [positions[t] for t in order],
                          progress=progress, compute_dtype=compute_dtype)
    start, offset = {}, 0
    for t in order:
        start[t], offset = offset, offset + len(positions[t])
    back = torch.cat([torch.arange(start[t], start[t] + len(positions[t])) for t in range(len(ids))])
    return states[:, back]


def paired_activations(
    old: LoadedModel,
    new: LoadedModel,
    texts: list[str],
    *,
    max_tokens: int,
    max_tokens_per_text: int = 256,
    batch_size: int = 64,
    batch_tokens: int = 1024,
    progress: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> PairedActivations:
    """Both models' states at the paired positions (module docstring); ``compute_dtype`` bfloat16: under autocast."""
    pairs, total = _paired_texts(old.tokenizer(), new.tokenizer(), texts, max_tokens, max_tokens_per_text)
    if total < 8:
        raise LorasuiteError(f"calibration text yields only {total} paired token positions; give more text")
    states = []
    for base, ids, pos in ((old, 0, 1), (new, 2, 3)):       # one model at a time
        states.append(_sorted_states(base, [p[ids] for p in pairs], [p[pos] for p in pairs], batch_size,
                                     batch_tokens, progress, compute_dtype)[:, :max_tokens])
    log.debug("paired %d token positions from %d texts", total, len(pairs))
    return PairedActivations(old_states=states[0].numpy(), new_states=states[1].numpy(), num_texts=len(pairs))
