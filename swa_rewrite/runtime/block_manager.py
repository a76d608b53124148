"""Paged-cache block allocation with reference-counted prefix sharing.

A block holds ``page_size`` consecutive positions of one request. A *full* block whose tokens (and all
tokens before it) are known is registered under a hash of that token prefix, so a later request with the
same prefix maps the same physical block instead of recomputing it. Blocks no request uses any more stay
cached (and reusable) until allocation needs them back, oldest first.
"""

from __future__ import annotations

import array
import collections
import hashlib
import numbers
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

from ..ops.checks import check_int


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
    """Reference-counted blocks ``0 .. num_blocks - 1`` of ``page_size`` positions each.

    Every method that takes block ids rejects ids outside ``[0, num_blocks)`` and non-integers, before it
    changes anything: a bad id never gives a block two owners.
    """

    def __init__(self, num_blocks: int, page_size: int):
        self.num_blocks = check_int("num_blocks", num_blocks, minimum=1)
        self.page_size = check_int("page_size", page_size, minimum=1)
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._refs = [0] * self.num_blocks
        self._key_of: dict[int, Hashable] = {}
        self._block_of: dict[Hashable, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no user, oldest first
        self._in_use = 0
        # Called with a cached block's key when allocation takes that block back (the KV-cache manager
        # withdraws the later pages of its chain).
        self.on_evict: Optional[Callable[[Hashable], None]] = None

    @property
    def num_free(self) -> int:
        """Blocks allocation can hand out: free ones and cached ones no request holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        """Blocks some request holds (a cached block nobody holds is not in use)."""
        return self._in_use

    def _block(self, block: int) -> int:
        """``block`` as an int, after checking it names a block of this pool."""
        if isinstance(block, bool) or not isinstance(block, numbers.Integral):
            raise TypeError(f"block id must be an integer, got {block!r} ({type(block).__name__})")
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is out of range [0, {self.num_blocks})")
        return int(block)

    def refcount(self, block: int) -> int:
        return self._refs[self._block(block)]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, each with one reference."""
        n = check_int("number of blocks to allocate", n)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} blocks, {self.num_free} free of {self.num_blocks}")
        out, evicted = [], []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                key = self._key_of.pop(block)
                del self._block_of[key]
                evicted.append(key)
            self._refs[block] = 1
            self._in_use += 1
            out.append(block)
        if self.on_evict is not None:
            for key in evicted:
                self.on_evict(key)
        return out

    def lookup(self, key: Hashable) -> Optional[int]:
        """The block cached as ``key``, or None (takes no reference)."""
        return self._block_of.get(key)

    def cached_prefix_length(self, keys: Sequence[Hashable]) -> int:
        """How many leading ``keys`` are cached."""
        n = 0
        while n < len(keys) and keys[n] in self._block_of:
            n += 1
        return n

    def acquire(self, key: Hashable) -> int:
        """Take a reference on the block cached as ``key`` (a KeyError if none is) and return it."""
        block = self._block_of[key]
        if self._refs[block] == 0:
            del self._evictable[block]
            self._in_use += 1
        self._refs[block] += 1
        return block

    def match_prefix(self, keys: Sequence[Hashable]) -> list[int]:
        """Take a reference on the cached blocks of the longest known prefix of ``keys``."""
        return [self.acquire(key) for key in keys[: self.cached_prefix_length(keys)]]

    def register(self, block: int, key: Hashable) -> bool:
        """Publish a full, written, allocated ``block`` as the cache of prefix ``key`` (first writer wins).

        Returns whether this call published it (False if ``key`` or ``block`` was already published)."""
        block = self._block(block)
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated: only a block a request holds can be published")
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key], self._key_of[block] = block, key
        return True

    def unregister(self, block: int, key: Hashable) -> None:
        """Withdraw ``block`` as the cache of ``key`` (e.g. its contents are not trusted any more); a no-op
        if ``block`` is not published under ``key`` now. Holders keep the block; unheld, it becomes free."""
        block = self._block(block)
        if self._key_of.get(block) != key:
            return
        del self._key_of[block], self._block_of[key]
        if block in self._evictable:
            del self._evictable[block]
            self._free.append(block)

    def withdraw_key(self, key: Hashable) -> None:
        """``unregister`` whatever block is cached as ``key`` (a no-op if none is)."""
        block = self._block_of.get(key)
        if block is not None:
            self.unregister(block, key)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free (or evictable if cached).

        All ids are checked first: a bad id, or a block freed more often than it is held, changes nothing."""
        blocks = [self._block(b) for b in blocks]
        for block, count in collections.Counter(blocks).items():
            if self._refs[block] < count:
                raise ValueError(f"block {block} freed more often than allocated (freed {count} times, "
                                 f"held {self._refs[block]} times)")
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._in_use -= 1
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
