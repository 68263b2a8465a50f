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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler reads a Request's ids and progress fields only
    from server.request import Request


@dataclass
class ScheduledChunk:
    """Tokens [start, start + length) of `request` run this step; `samples` when the chunk
    reaches the sequence's last token (so a new token is drawn from its last logits)."""

    request: Request
    start: int
    length: int
    samples: bool = field(init=False)  # fixed when planned, before tokens are appended

    def __post_init__(self) -> None:
        self.samples = self.start + self.length == self.request.num_tokens


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
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.by_id: dict[str, Request] = {}

    # ---- requests in and out ----
    def add(self, request: Request) -> None:
        if request.request_id in self.by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.by_id[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Finish `request` (done, aborted or failed) and free its slot at once."""
        if request.finished:
            return
        request.finished, request.finish_reason = True, reason
        if request.slot is not None:
            heapq.heappush(self.free_slots, request.slot)
            request.slot = None
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        del self.by_id[request.request_id]

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
        for request in self.running:  # decodes first: they never wait behind prompts
            if not request.prefilling and budget > 0:
                decodes.append(ScheduledChunk(request, request.num_computed, 1))
                budget -= 1
        for request in self.running:  # then prompts already started (admission order)
            if request.prefilling and budget > 0:
                chunk = self._prefill_chunk(request, budget, alone=not decodes and not prefills)
                if chunk:
                    prefills.append(chunk)
                    budget -= chunk.length
        while self.waiting and self.free_slots and budget > 0:
            request = self.waiting[0]
            chunk = self._prefill_chunk(request, budget, alone=not decodes and not prefills)
            if chunk is None:
                break  # first come, first served: do not let later requests overtake
            self.waiting.popleft()
            request.slot = heapq.heappop(self.free_slots)
            self.running.append(request)
            prefills.append(chunk)
            budget -= chunk.length
        decodes.sort(key=lambda c: c.request.slot)
        return SchedulerPlan(decodes + prefills)

    def _prefill_chunk(self, request: Request, budget: int, alone: bool) -> ScheduledChunk | None:
        remaining = request.num_tokens - request.num_computed
        if self.chunked:
            return ScheduledChunk(request, request.num_computed, min(remaining, budget))
        if remaining <= budget or alone:  # a whole prompt; an oversized one runs alone
            return ScheduledChunk(request, request.num_computed, remaining)
        return None

    def update(self, plan: SchedulerPlan) -> None:
        """Record that the plan's tokens are now in the cache (before new tokens are added)."""
        for chunk in plan.chunks:
            chunk.request.num_computed = chunk.start + chunk.length
