"""The scheduler without a model: budgets, chunked prefill, admission order, slots, aborts."""

from __future__ import annotations

import random

from server.request import Request
from server.sampling import SamplingParams
from server.scheduler import Scheduler


def seq(rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(s: Scheduler, token: int = 7):
    """Schedule, mark computed, append a 'sampled' token to every sampling sequence."""
    plan = s.schedule()
    slots = [c.request.slot for c in plan.chunks]
    assert None not in slots and len(set(slots)) == len(slots), "one slot per sequence"
    s.update(plan)
    for c in plan.chunks:
        if c.samples:
            c.request.output_ids.append(token)
            if len(c.request.output_ids) >= c.request.max_tokens:
                s.finish(c.request, "length")
    return plan


def test_chunked_prefill_keeps_decodes_running():
    s = Scheduler(num_slots=4, max_num_batched_tokens=8)
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
    s = Scheduler(num_slots=4, max_num_batched_tokens=8, enable_chunked_prefill=False)
    a = seq("a", 2, max_tokens=3)
    s.add(a)
    run_step(s)
    s.add(seq("b", 20))
    plan = run_step(s)  # b does not fit next to a's decode: only a runs
    assert [c.request.request_id for c in plan.chunks] == ["a"]
    run_step(s)  # a finishes (3 tokens)
    plan = run_step(s)  # alone, the oversized prompt runs whole
    assert [(c.request.request_id, c.length) for c in plan.chunks] == [("b", 20)]


def test_admission_is_first_come_first_served_and_bounded_by_slots():
    s = Scheduler(num_slots=2, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(seq(rid, 5))
    plan = s.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"] and s.num_free_slots == 0


def test_decodes_come_first_sorted_by_slot():
    s = Scheduler(num_slots=4, max_num_batched_tokens=100)
    for rid in "abcd":
        s.add(seq(rid, 2, max_tokens=10))
    run_step(s)
    s.finish(s.by_id["b"], "abort")  # frees slot 1
    s.add(seq("e", 2, max_tokens=10))
    run_step(s)  # e takes the lowest free slot
    assert s.by_id["e"].slot == 1
    plan = s.schedule()
    assert [c.request.slot for c in plan.chunks] == [0, 1, 2, 3]


def test_abort_frees_the_slot_at_once_and_waiting_requests_can_be_aborted():
    s = Scheduler(num_slots=1, max_num_batched_tokens=10)
    a, b = seq("a", 3), seq("b", 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(b, "abort")  # still waiting
    s.finish(a, "abort")
    assert s.num_free_slots == 1 and not s.has_unfinished() and a.slot is None
    s.finish(a, "abort")  # idempotent
    assert s.num_free_slots == 1


def test_random_workload_ends_with_every_slot_free():
    rng = random.Random(1)
    s = Scheduler(num_slots=5, max_num_batched_tokens=16)
    for i in range(400):
        s.add(seq(f"r{i}", rng.randint(1, 30), rng.randint(1, 8)))
        for _ in range(rng.randint(0, 2)):
            plan = run_step(s)
            assert plan.num_tokens <= 16
        if s.running and rng.random() < 0.2:
            s.finish(rng.choice(s.running), "abort")
    while s.has_unfinished():
        run_step(s)
    assert s.num_free_slots == 5 and not s.by_id and not s.running
