"""One engine request, the single object the engine, scheduler and sampler share.

A `Request` is built once, when the engine admits it, from the prompt ids and a
`SamplingParams` that already checked its own ranges. It carries everything a request needs
from admission to its final output: the ids (prompt and generated), the scheduling progress
(`num_computed`, the block table, `finished`), the sampler's state (its own `torch.Generator`, the
ids that end it, the token history the penalties read) and the incremental detokenizer.
The scheduler reads only the ids and the progress fields, the sampler only the sampling
fields, so each stays testable without the other. This module knows no model and no HTTP;
server/engine.py creates requests, server/scheduler.py and server/sampling.py read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.block_pool import BlockTable

if TYPE_CHECKING:
    from server.detokenizer import IncrementalDetokenizer
    from server.sampling_params import SamplingParams


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    # ---- scheduling ----
    num_computed: int = 0  # tokens whose keys/values are in the cache
    blocks: BlockTable = field(default_factory=BlockTable)  # where they are
    running: bool = False  # holds blocks (admitted and not preempted or finished)
    prefill_target: int = -1  # prefill up to here (the prompt; after a preemption, every
    #                           token so far), then decode one token a step; -1: the prompt
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # ---- sampling ----
    generator: torch.Generator | None = None  # None for greedy requests
    stop_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    _seen: torch.Tensor | None = None  # (vocab,) bool: prompt + output ids (repetition)
    _counts: torch.Tensor | None = None  # (vocab,) fp32: output id counts (presence/freq.)
    # ---- output ----
    detok: IncrementalDetokenizer | None = None
    prompt_logprobs: list | None = None  # filled while prefilling when asked for
    sent_first: bool = False

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams,
               eos_id: int | None = None, device: torch.device | str = "cpu",
               detok: IncrementalDetokenizer | None = None) -> Request:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        stop_ids = set(params.stop_token_ids)
        if eos_id is not None and not params.ignore_eos:
            stop_ids.add(eos_id)
        return cls(request_id, list(prompt_ids), params, generator=generator,
                   stop_ids=frozenset(stop_ids), detok=detok,
                   prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    # ---- ids and progress ----
    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_end(self) -> int:
        """Prefill chunks run up to here; after it, one token a step."""
        return len(self.prompt_ids) if self.prefill_target < 0 else self.prefill_target

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_end

    @property
    def token_ids(self) -> list[int]:
        """Prompt and generated ids, one new list."""
        return self.prompt_ids + self.output_ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet: every prompt position must
        run through the model, so such a request does not read the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    @property
    def below_min_tokens(self) -> bool:
        """min_tokens not reached: EOS, stop ids and stop strings do not end it yet."""
        return len(self.output_ids) < self.params.min_tokens

    @property
    def bans_stop_ids(self) -> bool:
        """Whether the sampler must mask this request's stop ids this step (min_tokens)."""
        return self.below_min_tokens and bool(self.stop_ids)

    @property
    def edits_logits(self) -> bool:
        """Whether the sampler edits this row's logits this step: bias, penalties, or stop
        ids masked until min_tokens."""
        return self.params.edits_logits or self.bans_stop_ids

    def append(self, token: int) -> None:
        """Record a generated token (and keep the penalties' history current)."""
        self.output_ids.append(token)
        if self._seen is not None:
            self._seen[token] = True
        if self._counts is not None:
            self._counts[token] += 1

    # ---- the penalties' history, built on first use and kept incrementally ----
    def seen_mask(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(vocab,) bool: the ids in the prompt or the output so far."""
        if self._seen is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = self.prompt_ids + self.output_ids
            self._seen[torch.tensor(ids, dtype=torch.long, device=device)] = True
        return self._seen

    def output_counts(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(vocab,) fp32: how often each id was generated so far."""
        if self._counts is None:
            ids = torch.tensor(self.output_ids, dtype=torch.long, device=device)
            self._counts = torch.bincount(ids, minlength=vocab_size)[:vocab_size].float()
        return self._counts
