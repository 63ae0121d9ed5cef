"""Shared vocabulary of two tokenizers, matched by the bytes each token stands for.

Tokenizers spell the same text differently: byte-level BPE writes a leading space as "Ġ"
(and every byte through GPT-2's printable byte alphabet), SentencePiece writes it as "▁" and
falls back to "<0xNN>" byte tokens. Both are normalised to the raw UTF-8 bytes the token
decodes to, so "Ġthe" and "▁the" both become b" the" and meet, while "the" (no space) stays
b"the" and does not meet them. Special tokens are left out: their embeddings are not text.

When several tokens of one tokenizer spell the same bytes, the one its own encoder emits wins:
an ordinary piece before a "<0xNN>" byte-fallback token (SentencePiece vocabularies such as
Gemma's hold both "5" and "<0x35>"; the encoder writes "5", and the fallback row is an
embedding the model barely trained), and among ordinary pieces the lowest id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table: printable char -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "metaspace"
    parts = (backend.decoder, backend.pre_tokenizer)   # their JSON state, not the whole vocabulary's
    text = "".join(part.__getstate__().decode() for part in parts if part is not None)
    return "byte_level" if "ByteLevel" in text else "metaspace"


def token_bytes(token: str, kind: str) -> bytes | None:
    if kind == "byte_level":
        table = _byte_level_decoder()
        if not all(ch in table for ch in token):
            return None
        return bytes(table[ch] for ch in token)
    fallback = BYTE_FALLBACK.match(token)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


def surface_forms(tokenizer) -> dict[bytes, int]:
    """bytes -> the token id spelling them (ordinary pieces before byte fallbacks, then the lowest id),
    special tokens excluded."""
    kind = _decoder_kind(tokenizer)
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
