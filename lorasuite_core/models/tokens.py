"""The bytes a tokenizer's tokens stand for.

Tokenizers spell the same text differently: byte-level BPE writes a leading space as "Ġ"
(and every byte through GPT-2's printable byte alphabet), SentencePiece writes it as "▁" and
falls back to "<0xNN>" byte tokens. :func:`token_bytes` normalises both to the raw UTF-8 bytes
the token decodes to, so "Ġthe" and "▁the" both become b" the" while "the" stays b"the".
:func:`token_surfaces` does it for a sequence of ids (special tokens: None), which lets two
tokenizations of one text be compared by byte offsets.
"""
from __future__ import annotations

import re
import weakref
from functools import lru_cache
from typing import Sequence

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


_KINDS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def decoder_kind(tokenizer) -> str:
    """"byte_level" (GPT-2's byte alphabet) or "metaspace" (SentencePiece spelling), once per tokenizer."""
    try:
        return _KINDS[tokenizer]
    except (KeyError, TypeError):   # TypeError: an object that takes no weak reference
        pass
    kind = _decoder_kind(tokenizer)
    try:
        _KINDS[tokenizer] = kind
    except TypeError:
        pass
    return kind


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


def token_surfaces(tokenizer, ids: Sequence[int]) -> list[bytes | None]:
    """The bytes of each id's token (None for special tokens and tokens without a byte spelling)."""
    kind = decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    return [None if i in special or t is None else token_bytes(t, kind) for i, t in zip(ids, tokens)]
