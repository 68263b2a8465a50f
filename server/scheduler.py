"""The scheduler: waiting and running queues, KV blocks, and which tokens run each step.

Plain Python, testable without a model. Each step it plans: every running sequence that is
decoding gets one token; sequences still prefilling get a chunk of their prompt; waiting
requests are admitted (first come, first served) while fewer than `max_num_seqs` run, the
pool has blocks for their first chunk and the step's token budget allows. An admitted
request starts after the longest prefix the prefix cache holds (server/block_pool.py). With
chunked prefill a long prompt is split across steps, so it never stalls the decodes of
others. When a running sequence needs a block and none is free, the youngest running
sequence not yet planned this step is preempted: its blocks go back (they stay in the prefix
cache), it returns to the head of the queue and later recomputes its prompt and what it
generated so far, so its client sees a slower stream, never an error; no new request is
admitted in a step that preempted. `update` records what the step computed and offers the
full blocks to the prefix cache; `finish` (also used for aborts) gives the blocks back.
This module knows nothing of tensors, sampling or tokenizers; server/engine.py drives it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.block_pool import BlockPool

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
    """Decode chunks first, then prefill chunks."""

    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True):
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last is the youngest
        self.by_id: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- requests in and out ----
    def add(self, request: Request) -> None:
        if request.request_id in self.by_id:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.by_id[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Finish `request` (done, aborted or failed) and give its blocks back at once."""
        if request.finished:
            return
        request.finished, request.finish_reason = True, reason
        if request.running:
            self._stop(request)
        else:
            self.waiting.remove(request)
        del self.by_id[request.request_id]

    def _stop(self, request: Request) -> None:
        self.pool.release(request.blocks)
        request.running = False
        self.running.remove(request)

    def preempt(self, request: Request) -> None:
        """Pause a running request: its blocks go back, it waits at the head of the queue
        and will prefill every token it has so far (prompt and output) again."""
        self._stop(request)
        request.num_computed = 0
        request.prefill_target = request.num_tokens
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----
    def schedule(self) -> SchedulerPlan:
        budget = self.token_budget
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        planned: set[int] = set()  # id() of the requests in this plan: never preempted
        preempted = False
        for request in list(self.running):  # decodes first: they never wait behind prompts
            if request.running and not request.prefilling and budget > 0:
                ok, hit = self._reserve(request, request.num_computed + 1, planned)
                preempted |= hit
                if ok:
                    decodes.append(ScheduledChunk(request, request.num_computed, 1))
                    planned.add(id(request))
                    budget -= 1
        for request in list(self.running):  # then prompts already started (admission order)
            if request.running and request.prefilling and budget > 0:
                chunk = self._prefill_chunk(request, budget, alone=not decodes and not prefills)
                if chunk is None:
                    continue
                ok, hit = self._reserve(request, chunk.start + chunk.length, planned)
                preempted |= hit
                if ok:
                    prefills.append(chunk)
                    planned.add(id(request))
                    budget -= chunk.length
        while (self.waiting and not preempted and len(self.running) < self.max_num_seqs
               and budget > 0):
            chunk = self._admit(self.waiting[0], budget, alone=not decodes and not prefills)
            if chunk is None:
                break  # first come, first served: do not let later requests overtake
            self.waiting.popleft()
            prefills.append(chunk)
            budget -= chunk.length
        return SchedulerPlan(decodes + prefills)

    def _reserve(self, request: Request, num_tokens: int, planned: set[int]) -> tuple[bool, bool]:
        """Blocks for `request`'s first `num_tokens` tokens, preempting the youngest
        unplanned sequences until they fit. (reserved, whether anything was preempted);
        not reserved when `request` itself was the one preempted."""
        preempted = False
        while not self.pool.allocate(request.blocks, num_tokens):
            victim = next(r for r in reversed(self.running) if id(r) not in planned)
            self.preempt(victim)
            preempted = True
            if victim is request:
                return False, True
        return True, preempted

    def _admit(self, request: Request, budget: int, alone: bool) -> ScheduledChunk | None:
        """The first chunk of a waiting request, after its cached prefix, with its blocks
        taken; None (nothing changed) when the budget or the pool cannot take it now."""
        tokens = request.token_ids
        use_cache = self.pool.enable_caching and not request.needs_prompt_logprobs
        hits = self.pool.lookup(request.blocks, tokens) if use_cache else []
        request.num_computed = len(hits) * self.pool.block_size
        chunk = self._prefill_chunk(request, budget, alone)
        if chunk is None or not self.pool.allocate(request.blocks, chunk.start + chunk.length,
                                                   hits):
            request.num_computed = 0
            return None
        if use_cache:
            self.pool.count_query(len(tokens), hits)
        request.running = True
        self.running.append(request)
        return chunk

    def _prefill_chunk(self, request: Request, budget: int, alone: bool) -> ScheduledChunk | None:
        remaining = request.prefill_end - request.num_computed
        if self.chunked:
            return ScheduledChunk(request, request.num_computed, min(remaining, budget))
        if remaining <= budget or alone:  # a whole prompt; an oversized one runs alone
            return ScheduledChunk(request, request.num_computed, remaining)
        return None

    def update(self, plan: SchedulerPlan) -> None:
        """Record that the plan's tokens are now in the cache (before new tokens are added)
        and offer the blocks they filled to the prefix cache."""
        for chunk in plan.chunks:
            request = chunk.request
            request.num_computed = chunk.start + chunk.length
            if request.running and self.pool.enable_caching \
                    and request.num_computed // self.pool.block_size > request.blocks.num_committed:
                self.pool.commit(request.blocks, request.token_ids, request.num_computed)
