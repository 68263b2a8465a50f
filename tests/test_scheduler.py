"""The scheduler without a model: budgets, chunked prefill, admission order, blocks, aborts,
prefix-cache hits and preemption."""

from __future__ import annotations

import random

from server.block_pool import BlockPool
from server.request import Request
from server.sampling import SamplingParams
from server.scheduler import Scheduler


def seq(rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def make(max_num_seqs: int, budget: int, num_blocks: int = 64, block_size: int = 4,
         chunked: bool = True, caching: bool = True) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, block_size, caching), max_num_seqs, budget, chunked)


def check_blocks(s: Scheduler) -> None:
    """Every running sequence holds the blocks for its computed tokens; no block is held by
    two sequences unless it is a cached, full one; the reference counts add up."""
    held: dict[int, int] = {}
    for r in s.running:
        assert len(r.blocks.block_ids) >= s.pool.blocks_for(r.num_computed)
        for b in r.blocks.block_ids:
            held[b] = held.get(b, 0) + 1
    for b in range(s.pool.num_blocks):
        assert s.pool.refs[b] == held.get(b, 0)
        assert (b in s.pool.free) == (held.get(b, 0) == 0)
        if held.get(b, 0) > 1:
            assert s.pool.key_of[b] is not None


def run_step(s: Scheduler, token: int = 7):
    """Schedule, mark computed, append a 'sampled' token to every sampling sequence."""
    plan = s.schedule()
    ids = [id(c.request) for c in plan.chunks]
    assert len(set(ids)) == len(ids), "one chunk per sequence"
    for c in plan.chunks:  # the blocks for the chunk's tokens are there
        assert len(c.request.blocks.block_ids) * s.pool.block_size >= c.start + c.length
    s.update(plan)
    check_blocks(s)
    for c in plan.chunks:
        if c.samples:
            c.request.output_ids.append(token)
            if len(c.request.output_ids) >= c.request.max_tokens:
                s.finish(c.request, "length")
    return plan


def test_chunked_prefill_keeps_decodes_running():
    s = make(4, 8)
    a = seq("a", 3, max_tokens=10)
    s.add(a)
    run_step(s)  # a's prompt in one go; it samples
    long = seq("long", 20)
    s.add(long)
    plan = run_step(s)
    assert [(c.request.request_id, c.length) for c in plan.chunks] == [("a", 1), ("long", 7)]
    plan = run_step(s)
    assert [(c.request.request_id, c.length) for c in plan.chunks] == [("a", 1), ("long", 7)]
    assert not plan.chunks[1].samples
    plan = run_step(s)
    assert [(c.request.request_id, c.length) for c in plan.chunks] == [("a", 1), ("long", 6)]
    assert plan.chunks[1].samples and long.output_ids == [7]


def test_without_chunking_a_prompt_waits_for_room_or_runs_alone():
    s = make(4, 8, chunked=False)
    a = seq("a", 2, max_tokens=3)
    s.add(a)
    run_step(s)
    s.add(seq("b", 20))
    plan = run_step(s)  # b does not fit next to a's decode: only a runs
    assert [c.request.request_id for c in plan.chunks] == ["a"]
    run_step(s)  # a finishes (3 tokens)
    plan = run_step(s)  # alone, the oversized prompt runs whole
    assert [(c.request.request_id, c.length) for c in plan.chunks] == [("b", 20)]


def test_admission_is_first_come_first_served_and_bounded_by_max_num_seqs():
    s = make(2, 100)
    for rid in "abc":
        s.add(seq(rid, 5))
    plan = s.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_admission_is_bounded_by_free_blocks():
    s = make(8, 100, num_blocks=5, block_size=4)
    for rid in "abc":
        s.add(seq(rid, 7))  # 2 blocks each for the prompt
    plan = s.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"]
    assert s.pool.num_free == 1 and [q.request_id for q in s.waiting] == ["c"]


def test_abort_frees_the_blocks_at_once_and_waiting_requests_can_be_aborted():
    s = make(1, 10, caching=False)
    a, b = seq("a", 3), seq("b", 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(b, "abort")  # still waiting
    s.finish(a, "abort")
    assert s.pool.num_free == s.pool.num_blocks and not s.has_unfinished()
    assert a.blocks.block_ids == []
    s.finish(a, "abort")  # idempotent
    assert s.pool.num_free == s.pool.num_blocks


def test_a_cached_prefix_is_skipped_but_the_last_token_is_computed():
    s = make(4, 100, block_size=4)
    a = seq("a", 10, max_tokens=2)
    s.add(a)
    run_step(s)
    a_blocks = list(a.blocks.block_ids)
    run_step(s)  # a finishes; its two full blocks stay cached
    b = Request("b", list(range(1, 11)) + [99], SamplingParams(max_tokens=1))  # shares 10
    s.add(b)
    plan = s.schedule()
    assert [(c.start, c.length) for c in plan.chunks] == [(8, 3)]
    assert b.blocks.block_ids[:2] == a_blocks[:2]  # shared, not copied
    s.update(plan)
    s.finish(b, "length")
    assert (s.pool.queries, s.pool.hits) == (10 + 11, 8)
    same = Request("c", list(range(1, 9)), SamplingParams(max_tokens=1))  # all 8 cached
    s.add(same)
    plan = run_step(s)
    assert [(c.start, c.length) for c in plan.chunks] == [(4, 4)]  # not (8, 0)


def test_pool_exhaustion_preempts_the_youngest_and_it_resumes_with_its_tokens():
    s = make(4, 100, num_blocks=4, block_size=4, caching=False)
    a, b = seq("a", 4, max_tokens=8), seq("b", 4, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)  # both prompts: 1 block each; both sample
    run_step(s)  # decode at position 4: a second block each (4 of 4)
    run_step(s)
    run_step(s)  # positions 6: still within the second block
    run_step(s)  # position 7 fits
    plan = s.schedule()  # position 8 needs a third block each: b (youngest) is preempted
    assert [c.request.request_id for c in plan.chunks] == ["a"]
    assert s.num_preemptions == 1 and list(s.waiting) == [b] and b.num_computed == 0
    assert b.prefill_end == b.num_tokens == 4 + 5
    s.update(plan)
    a.output_ids.append(7)
    while not a.finished:
        run_step(s)
    plan = run_step(s)  # b comes back: prompt and its 5 tokens in one chunk, then samples
    assert [(c.request.request_id, c.start, c.length, c.samples)
            for c in plan.chunks] == [("b", 0, 9, True)]
    while s.has_unfinished():
        run_step(s)
    assert len(b.output_ids) == 8 and s.pool.num_free == 4


def test_a_sequence_that_needs_a_block_preempts_itself_when_it_is_the_youngest():
    s = make(4, 100, num_blocks=3, block_size=4, caching=False)
    a, b = seq("a", 4, max_tokens=8), seq("b", 8, max_tokens=4)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 1 block, b: 2 blocks; the pool is full
    plan = s.schedule()  # a (oldest) needs a block at position 4: b is preempted
    assert [c.request.request_id for c in plan.chunks] == ["a"] and list(s.waiting) == [b]


def test_random_workload_ends_with_every_block_free():
    rng = random.Random(1)
    for caching in (True, False):
        s = make(5, 16, num_blocks=12, block_size=4, caching=caching)
        for i in range(400):
            prompt = [rng.randint(1, 3) for _ in range(rng.randint(1, 30))]  # shared prefixes
            s.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 8))))
            for _ in range(rng.randint(0, 2)):
                plan = run_step(s)
                assert plan.num_tokens <= 16
            if s.running and rng.random() < 0.2:
                s.finish(rng.choice(s.running), "abort")
        while s.has_unfinished():
            run_step(s)
        assert s.pool.num_free == 12 and not s.by_id and not s.running
        assert (s.pool.hits > 0) == caching and s.num_preemptions > 0
