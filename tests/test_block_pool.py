"""The block allocator and prefix cache against a model of what they must do (hypothesis).

Random add / grow / finish / abort sequences over a small pool, so that blocks are evicted
often. The model keeps, independently of the pool: which sequence holds which block, which
token prefix each cached block holds, when each block was freed, and the query / hit
totals. After every step: reference counts equal the blocks the sequences hold, no block is
handed out while a sequence holds it, lookups find exactly the cached prefix the model
expects, eviction takes key-less blocks first and then the least recently freed cached ones,
and at the end every block is free.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from server.block_pool import BlockPool, BlockTable

BS = 2  # tokens per block: small, so that prompts span several blocks
NUM_BLOCKS = 8
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # few ids: shared prefixes


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BS)
        self.seqs: dict[int, tuple[list[int], BlockTable]] = {}
        self.next_id = 0
        self.cache: dict[tuple[int, ...], int] = {}  # the model's prefix -> block
        self.freed_at = {b: -1 for b in range(NUM_BLOCKS)}  # when a block was last freed
        self.clock = 0
        self.queries = self.hits = 0

    # ---- the model ----
    def held(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for _, table in self.seqs.values():
            for b in table.block_ids:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def expected_hits(self, tokens: list[int]) -> list[int]:
        hits = []
        for j in range(1, (len(tokens) - 1) // BS + 1):
            block = self.cache.get(tuple(tokens[: j * BS]))
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, table: BlockTable, num_tokens: int, cached=()) -> bool:
        """Allocate through the pool and check what it handed out against the model."""
        held = self.held()
        free = [b for b in range(NUM_BLOCKS) if b not in held]
        before = len(table.block_ids)
        ok = self.pool.allocate(table, num_tokens, cached)
        need = self.pool.blocks_for(num_tokens) - before - len(cached)
        revived = sum(1 for b in cached if b not in held)
        assert ok == (max(need, 0) + revived <= len(free))
        if not ok:
            assert len(table.block_ids) == before
            return False
        new = table.block_ids[before + len(cached):]
        assert not set(new) & set(held), "a block handed out while a sequence holds it"
        assert len(set(new)) == len(new) and not set(new) & set(cached)
        keyed = set(self.cache.values())
        keyless = [b for b in free if b not in keyed and b not in cached]
        lru = sorted((b for b in free if b in keyed and b not in cached),
                     key=lambda b: self.freed_at[b])
        from_keyless = [b for b in new if b in keyless]  # in any order among themselves
        assert len(from_keyless) == min(len(new), len(keyless)), "evicted while others free"
        assert set(new) - set(keyless) == set(lru[: len(new) - len(from_keyless)]), "not LRU"
        self.cache = {p: b for p, b in self.cache.items() if b not in new}  # evicted
        return True

    def commit(self, tokens: list[int], table: BlockTable, num_computed: int) -> None:
        keyed = set(self.cache.values())
        for i in range(table.num_committed, num_computed // BS):
            prefix, block = tuple(tokens[: (i + 1) * BS]), table.block_ids[i]
            if prefix not in self.cache and block not in keyed:
                self.cache[prefix] = block
                keyed.add(block)
        self.pool.commit(table, tokens, num_computed)

    # ---- rules ----
    @rule(tokens=tokens_st, computed=st.integers(0, 9))
    def add(self, tokens, computed):
        table = BlockTable()
        hits = self.pool.lookup(table, tokens)
        assert hits == self.expected_hits(tokens), "lookup != the model's cached prefix"
        if not self.allocate(table, len(tokens), hits):
            return
        self.pool.count_query(len(tokens), hits)
        self.queries += len(tokens)
        self.hits += len(hits) * BS
        self.seqs[self.next_id] = (tokens, table)
        self.next_id += 1
        start = len(hits) * BS
        self.commit(tokens, table, min(len(tokens), start + computed))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), more=tokens_st)
    def grow(self, data, more):
        key = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, table = self.seqs[key]
        if not self.allocate(table, len(tokens) + len(more)):
            return
        tokens.extend(more)
        self.commit(tokens, table, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), reason=st.sampled_from(["finish", "abort"]))
    def end(self, data, reason):
        key = data.draw(st.sampled_from(sorted(self.seqs)))
        _, table = self.seqs.pop(key)
        blocks = list(table.block_ids)
        self.pool.release(table)
        held = self.held()
        for b in reversed(blocks):  # released last first: the deepest is evicted first
            if b not in held:
                self.clock += 1
                self.freed_at[b] = self.clock
        assert table.block_ids == []

    # ---- after every step ----
    @invariant()
    def counts_match(self):
        held = self.held()
        assert self.pool.refs == [held.get(b, 0) for b in range(NUM_BLOCKS)]
        assert set(self.pool.free) == {b for b in range(NUM_BLOCKS) if b not in held}
        assert sorted(self.pool.cached.values()) == sorted(self.cache.values())
        assert (self.pool.queries, self.pool.hits) == (self.queries, self.hits)

    def teardown(self):
        for _, table in self.seqs.values():
            self.pool.release(table)
        assert self.pool.num_free == NUM_BLOCKS and not any(self.pool.refs), "a block leaked"


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_keys_name_whole_prefixes():
    pool = BlockPool(8, 2)
    a = BlockTable()
    assert pool.allocate(a, 4)
    pool.commit(a, [1, 2, 3, 4], 4)
    assert pool.lookup(BlockTable(), [9, 9, 3, 4, 5]) == []  # same 2nd block, other parent
    assert pool.lookup(BlockTable(), [1, 2, 3, 4, 5]) == a.block_ids
    assert pool.lookup(BlockTable(), [1, 2, 3, 4]) == a.block_ids[:1]  # the last is computed
