"""Shared vocabulary of two tokenizers, matched by the bytes each token stands for.

Both vocabularies are normalised to raw UTF-8 bytes (:mod:`lorasuite_core.models.tokens`), so
"Ġthe" and "▁the" both become b" the" and meet, while "the" (no space) stays b"the" and does
not meet them. Special tokens are left out: their embeddings are not text.

When several tokens of one tokenizer spell the same bytes, the one its own encoder emits wins:
an ordinary piece before a "<0xNN>" byte-fallback token (SentencePiece vocabularies such as
Gemma's hold both "5" and "<0x35>"; the encoder writes "5", and the fallback row is an
embedding the model barely trained), and among ordinary pieces the lowest id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorasuite_core.models.tokens import BYTE_FALLBACK, decoder_kind, token_bytes


def surface_forms(tokenizer) -> dict[bytes, int]:
    """bytes -> the token id spelling them (ordinary pieces before byte fallbacks, then the lowest id),
    special tokens excluded."""
    kind = decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    forms: dict[bytes, int] = {}
    fallback_last = lambda kv: (kind != "byte_level" and BYTE_FALLBACK.match(kv[0]) is not None, kv[1])
    for token, idx in sorted(tokenizer.get_vocab().items(), key=fallback_last):
        if idx in special or idx in added:
            continue
        surface = token_bytes(token, kind)
        if surface and surface not in forms:
            forms[surface] = idx
    return forms


@dataclass(frozen=True)
class SharedVocabulary:
    old_ids: np.ndarray   # (n,) int64
    new_ids: np.ndarray   # (n,) int64, same order

    def __len__(self) -> int:
        return len(self.old_ids)

    def old_to_new(self) -> dict[int, int]:
        return dict(zip(self.old_ids.tolist(), self.new_ids.tolist()))


def shared_vocabulary(old_tokenizer, new_tokenizer) -> SharedVocabulary:
    old_forms, new_forms = surface_forms(old_tokenizer), surface_forms(new_tokenizer)
    common = sorted(set(old_forms) & set(new_forms), key=lambda s: old_forms[s])
    return SharedVocabulary(
        old_ids=np.array([old_forms[s] for s in common], dtype=np.int64),
        new_ids=np.array([new_forms[s] for s in common], dtype=np.int64),
    )
