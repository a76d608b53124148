"""Paged-cache block allocation with reference-counted prefix sharing.

A block holds ``page_size`` consecutive positions of one request. A *full* block whose tokens (and all
tokens before it) are known is registered under a hash of that token prefix, so a later request with the
same prefix maps the same physical block instead of recomputing it. Blocks no request uses any more stay
cached (and reusable) until allocation needs them back, oldest first.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict
from typing import Hashable, Sequence


class OutOfBlocksError(RuntimeError):
    """The cache has fewer free blocks than a request needs."""


def chain_block_key(parent: Hashable, block_tokens: Sequence[int]) -> Hashable:
    """Key of a full block given the key of the block before it (``None`` for the first): a SHA-256
    digest of the parent's key and the block's tokens, so two different prefixes never share a block."""
    h = hashlib.sha256(parent if isinstance(parent, bytes) else b"")
    h.update(array.array("q", block_tokens).tobytes())
    return h.digest()


def prefix_block_keys(tokens: Sequence[int], page_size: int) -> list[Hashable]:
    """One key per full block of ``tokens``; each key identifies the whole prefix up to that block's end."""
    keys, parent = [], None
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = chain_block_key(parent, tokens[start:start + page_size])
        keys.append(parent)
    return keys


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int):
        if num_blocks < 1 or page_size < 1:
            raise ValueError(f"num_blocks and page_size must be >= 1, got {num_blocks}, {page_size}")
        self.num_blocks, self.page_size = num_blocks, page_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, Hashable] = {}
        self._block_of: dict[Hashable, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no user, oldest first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, each with one reference."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} blocks, {self.num_free} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def match_prefix(self, keys: Sequence[Hashable]) -> list[int]:
        """Take a reference on the cached blocks of the longest known prefix of ``keys``."""
        out = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            out.append(block)
        return out

    def register(self, block: int, key: Hashable) -> None:
        """Publish a full, written ``block`` as the cache of prefix ``key`` (first writer wins)."""
        if key in self._block_of or block in self._key_of:
            return
        self._block_of[key], self._key_of[block] = block, key

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free (or evictable if cached)."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} freed more often than allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
