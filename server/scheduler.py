"""The scheduler: waiting and running queues, cache slots, and which tokens run each step.

Plain Python, testable without a model. Each step it plans: every running sequence that is
decoding gets one token; sequences still prefilling get a chunk of their prompt; waiting
requests are admitted (first come, first served) while a cache slot is free and the step's
token budget allows. With chunked prefill a long prompt is split across steps, so it never
stalls the decodes of others. `update` records what the step computed; `finish` (also used
for aborts) frees the slot at once. Slots are handed out lowest-first and the decode rows of
a plan are sorted by slot, so the decode batch usually reads a contiguous run of cache rows.
This module knows nothing of tensors, sampling or tokenizers; server/engine.py drives it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it; `data` is the engine's per-request state."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    slot: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    data: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


@dataclass
class ScheduledChunk:
    """Tokens [start, start + length) of `seq` run this step; `samples` when the chunk
    reaches the sequence's last token (so a new token is drawn from its last logits)."""

    seq: Sequence
    start: int
    length: int
    samples: bool = field(init=False)  # fixed when planned, before tokens are appended

    def __post_init__(self) -> None:
        self.samples = self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerPlan:
    """Decode chunks first (sorted by slot), then prefill chunks."""

    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.num_slots = num_slots
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.free_slots = list(range(num_slots))  # a min-heap: lowest slot first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}

    # ---- requests in and out ----
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish `seq` (done, aborted or failed) and free its slot at once."""
        if seq.finished:
            return
        seq.finished, seq.finish_reason = True, reason
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self.by_id[seq.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    # ---- one step ----
    def schedule(self) -> SchedulerPlan:
        budget = self.token_budget
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in self.running:  # decodes first: they never wait behind prompts
            if not seq.prefilling and budget > 0:
                decodes.append(ScheduledChunk(seq, seq.num_computed, 1))
                budget -= 1
        for seq in self.running:  # then prompts already started (admission order)
            if seq.prefilling and budget > 0:
                chunk = self._prefill_chunk(seq, budget, alone=not decodes and not prefills)
                if chunk:
                    prefills.append(chunk)
                    budget -= chunk.length
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting[0]
            chunk = self._prefill_chunk(seq, budget, alone=not decodes and not prefills)
            if chunk is None:
                break  # first come, first served: do not let later requests overtake
            self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            prefills.append(chunk)
            budget -= chunk.length
        decodes.sort(key=lambda c: c.seq.slot)
        return SchedulerPlan(decodes + prefills)

    def _prefill_chunk(self, seq: Sequence, budget: int, alone: bool) -> ScheduledChunk | None:
        remaining = seq.num_tokens - seq.num_computed
        if self.chunked:
            return ScheduledChunk(seq, seq.num_computed, min(remaining, budget))
        if remaining <= budget or alone:  # a whole prompt; an oversized one runs alone
            return ScheduledChunk(seq, seq.num_computed, remaining)
        return None

    def update(self, plan: SchedulerPlan) -> None:
        """Record that the plan's tokens are now in the cache (before new tokens are added)."""
        for chunk in plan.chunks:
            chunk.seq.num_computed = chunk.start + chunk.length
