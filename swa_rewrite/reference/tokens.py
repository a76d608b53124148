"""The reference model's byte-level vocabulary: ids 0-255 are bytes, then a few special tokens.

``VOCAB_SIZE`` pads the vocabulary to a multiple of 64 (embedding and head rows no token uses stay untrained).
"""

from __future__ import annotations

from typing import Iterable

BOS = 256          # start of a file (document)
EOS = 257          # end of a document (not used in training; for callers that want one)
PAD = 258
NUM_SPECIAL = 3
VOCAB_SIZE = 320   # 256 bytes + specials, padded to a multiple of 64

__all__ = ["BOS", "EOS", "PAD", "VOCAB_SIZE", "decode", "encode"]


def encode(text: str | bytes, *, bos: bool = True) -> list[int]:
    """Token ids of ``text`` (a ``str`` is UTF-8 encoded): its bytes, after ``BOS`` when ``bos``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([BOS] if bos else []) + list(data)


def decode(ids: Iterable[int]) -> str:
    """The text of byte tokens ``ids`` (special tokens dropped; invalid UTF-8 shown as U+FFFD)."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
