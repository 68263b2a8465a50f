"""The KV cache's block allocator and prefix cache: which block holds which tokens.

The KV cache (server/kv_cache.py) is a pool of `num_blocks` blocks of `block_size` tokens.
A sequence holds a `BlockTable`: the ids of the blocks its tokens live in, in order (token
at position p is at offset p % block_size of block `block_ids[p // block_size]`). Blocks
are taken as the sequence grows and given back when it ends, is aborted or is preempted.

Prefix caching (as vLLM's automatic prefix caching): once a block is full and computed, it
is registered under a key that hashes (the previous block's key, its token ids), so a key
names a whole prefix. A new sequence whose first full blocks have cached keys takes those
blocks (reference counted, read-only: a sequence only ever writes past its cached prefix)
and computes only the rest. A block whose count drops to 0 keeps its key and goes to the
tail of the free queue; allocation takes blocks from the head, so cached blocks are evicted
least-recently-used and only when the pool needs them. Blocks that hold no key go to the
head (reused first), and a sequence's blocks are given back last-first, so its deepest
blocks are evicted before its prefix. Keys are SHA-256 digests (no collisions to handle).

Plain Python, no tensors: this module knows token ids and block ids, nothing of requests,
models or scheduling. server/scheduler.py drives it; tests/test_block_pool.py checks it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    """One sequence's blocks. `hashes` are the keys of its full blocks of known tokens (kept
    across a preemption: the tokens do not change); `num_committed` leading blocks have been
    offered to the prefix cache."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_committed: int = 0


def block_key(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The key of a full block: a digest of its parent's key and its token ids."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockPool:
    """Reference-counted blocks, an LRU free queue, and the prefix cache's key -> block map."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching = enable_caching
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block id
        # blocks nobody references, least recently used first (evicted from the head)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.queries = 0  # prefix cache lookups, in tokens (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vLLM's prefix_cache_hits)

    # ---- counts ----
    @property
    def num_free(self) -> int:
        """Blocks nobody references (cached ones included: they can be evicted)."""
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of the blocks that running sequences reference, 0..1."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----
    def _extend_hashes(self, table: BlockTable, tokens: Sequence[int], num_blocks: int) -> None:
        """Make sure `table.hashes` covers the first `num_blocks` full blocks of `tokens`."""
        bs = self.block_size
        while len(table.hashes) < num_blocks:
            i = len(table.hashes)
            parent = table.hashes[-1] if i else None
            table.hashes.append(block_key(parent, tokens[i * bs: (i + 1) * bs]))

    def lookup(self, table: BlockTable, tokens: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `tokens` (the sequence's tokens so
        far), leaving at least the last token to compute: its logits give the next token.
        Nothing is taken or counted (`count_query` counts an admission's lookup)."""
        if not self.enable_caching:
            return []
        limit = (len(tokens) - 1) // self.block_size
        self._extend_hashes(table, tokens, limit)
        hits = []
        for key in table.hashes[:limit]:
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_query(self, num_tokens: int, hits: Sequence[int]) -> None:
        """Count a lookup whose sequence was admitted: its tokens and the cached ones (vLLM
        counts both in tokens)."""
        self.queries += num_tokens
        self.hits += len(hits) * self.block_size

    def commit(self, table: BlockTable, tokens: Sequence[int], num_computed: int) -> None:
        """Offer the sequence's full, computed blocks to the prefix cache. A key already
        cached (the same prefix computed twice at once) keeps its first block; this copy
        stays private to the sequence and is reused first once freed."""
        full = num_computed // self.block_size
        if not self.enable_caching or full <= table.num_committed:
            return
        self._extend_hashes(table, tokens, full)
        for i in range(table.num_committed, full):
            key, block = table.hashes[i], table.block_ids[i]
            if key not in self.cached and self.key_of[block] is None:
                self.cached[key] = block
                self.key_of[block] = key
        table.num_committed = full

    # ---- blocks in and out ----
    def allocate(self, table: BlockTable, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Grow `table` to hold `num_tokens` tokens: first the `cached` blocks (a `lookup`
        result, for a table that holds none yet), then new blocks. False, with nothing
        changed, when the pool has too few blocks."""
        new = self.blocks_for(num_tokens) - len(table.block_ids) - len(cached)
        revived = sum(1 for b in cached if self.refs[b] == 0)  # they leave the free queue
        if max(new, 0) + revived > self.num_free:
            return False
        for block in cached:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        table.block_ids.extend(cached)
        table.num_committed = max(table.num_committed, len(table.block_ids))
        for _ in range(new):
            block, _ = self.free.popitem(last=False)  # the least recently used
            key = self.key_of[block]
            if key is not None:  # evicted from the prefix cache
                del self.cached[key]
                self.key_of[block] = None
            self.refs[block] = 1
            table.block_ids.append(block)
        return True

    def release(self, table: BlockTable) -> None:
        """Give back all of the table's blocks (last first); cached ones stay cached."""
        for block in reversed(table.block_ids):
            self.refs[block] -= 1
            assert self.refs[block] >= 0, f"block {block} released twice"
            if self.refs[block] == 0:
                self.free[block] = None  # the tail: evicted last
                if self.key_of[block] is None:
                    self.free.move_to_end(block, last=False)  # holds nothing worth keeping
        table.block_ids = []
        table.num_committed = 0
