"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat).

A formatter turns the merged `(choice index, RequestOutput)` stream of one HTTP request into
either one response body (`collect`) or a sequence of JSON chunk strings (`stream`), with the
OpenAI shapes: legacy completion logprobs (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), chat logprobs (`token`, `logprob`, `bytes`, `top_logprobs`), the chat delta
sequence (role first, content, then an empty delta with the finish reason) and the
usage-only chunk with `choices: []` for `stream_options.include_usage`. It knows nothing
about HTTP, pydantic validation or the engine's internals; server/api.py drives it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.protocol import (
    ChatCompletionResponse,
    CompletionResponse,
)


class GenerationFailed(Exception):
    """An engine request finished with "error" or "abort"; api.py renders it (500 / 503)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Submission:
    """One engine request: choice `index` = prompt_index * n + sample index."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: object  # SamplingParams with n=1
    request_id: str


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    prefix: str              # the echoed prompt ("" without echo)
    prompt_ids: list[int]
    text: list[str] = field(default_factory=list)
    num_generated: int = 0
    finish_reason: str | None = None
    offset: int = 0          # legacy logprobs: character offset of the next token
    started: bool = False    # chat: the role delta went out; completions: the prefix did
    logprobs: list | None = None  # accumulated logprobs entries (collect only)


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _check(out) -> None:
    if out.finished and out.finish_reason in ("error", "abort"):
        message = out.error or ("the request was aborted" if out.finish_reason == "abort"
                                else "generation failed")
        raise GenerationFailed(out.finish_reason, message)


class _Formatter:
    object_name = ""

    def __init__(self, request_id: str, model: str, states: list[ChoiceState], token_text,
                 logprobs: int | None, include_usage: bool):
        self.id, self.model, self.states = request_id, model, states
        self.token_text, self.num_top, self.include_usage = token_text, logprobs, include_usage
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        prompts = {id(s.prompt_ids): len(s.prompt_ids) for s in self.states}  # once per prompt
        prompt = sum(prompts.values())
        completion = sum(s.num_generated for s in self.states)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def chunk(self, choices: list[dict]) -> str:
        body = {"id": self.id, "object": self.object_name, "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return dumps(body)

    def usage_chunk(self) -> str:
        return dumps({"id": self.id, "object": self.object_name, "created": self.created,
                      "model": self.model, "choices": [], "usage": self.usage()})

    def top(self, entry) -> list[tuple[int, float]]:
        return entry.top[:self.num_top] if self.num_top else []


class completion_chunks(_Formatter):  # noqa: N801 - reads as a function at the call site
    """Formats /v1/completions."""

    object_name = "text_completion"

    def __init__(self, request_id, model, states, token_text, logprobs: int | None,
                 echo: bool, include_usage: bool, num_prompts: int = 1):
        super().__init__(request_id, model, states, token_text, logprobs, include_usage)
        self.echo = echo

    def _legacy(self, state: ChoiceState, ids, entries) -> dict:
        """The legacy logprobs object for tokens `ids` (entries None = no logprob: the first
        prompt token); advances the choice's text offset."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for tid, entry in zip(ids, entries):
            text = self.token_text.text(tid)
            tokens.append(text)
            offsets.append(state.offset)
            state.offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                tops.append(None)
                continue
            token_logprobs.append(entry.logprob)
            top = {self.token_text.text(t): lp for t, lp in self.top(entry)}
            top.setdefault(text, entry.logprob)  # the sampled token is always listed
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def _piece(self, state: ChoiceState, out) -> tuple[str, dict | None]:
        """The text and logprobs this output adds to its choice (the echo comes first)."""
        text, lp = out.text, None
        if not state.started:
            state.started = True
            text = state.prefix + text
            if self.echo and self.num_top is not None and out.prompt_logprobs is not None:
                lp = self._legacy(state, out.prompt_token_ids, out.prompt_logprobs)
            state.offset = len(state.prefix)
        if self.num_top is not None:
            new = self._legacy(state, out.token_ids, out.logprobs or [None] * len(out.token_ids))
            lp = new if lp is None else {k: lp[k] + new[k] for k in lp}
        state.text.append(text)
        state.num_generated = out.num_generated_tokens
        if out.finished:
            state.finish_reason = out.finish_reason
        return text, lp

    async def stream(self, fan) -> AsyncIterator[str]:
        async for i, out in fan.outputs():
            _check(out)
            state = self.states[i]
            text, lp = self._piece(state, out)
            if text or lp is not None or out.finished:
                yield self.chunk([{"text": text, "index": state.index, "logprobs": lp,
                                   "finish_reason": out.finish_reason if out.finished
                                   else None}])
        if self.include_usage:
            yield self.usage_chunk()

    async def collect(self, fan) -> CompletionResponse:
        merged: dict[int, dict | None] = {}
        async for i, out in fan.outputs():
            _check(out)
            _, lp = self._piece(self.states[i], out)
            if lp is not None:
                prev = merged.get(i)
                merged[i] = lp if prev is None else {k: prev[k] + lp[k] for k in prev}
        return self.response(merged)

    def response(self, merged: dict[int, dict | None]) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=self.usage(),
            choices=[{"text": "".join(s.text), "index": s.index, "finish_reason":
                      s.finish_reason,
                      "logprobs": merged.get(i, self._empty_logprobs())}
                     for i, s in enumerate(self.states)])

    def _empty_logprobs(self):
        if self.num_top is None:
            return None
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    @classmethod
    def echo_only(cls, request_id, model, states, stream, include_usage,
                  sse_response):
        """max_tokens 0 with echo and no logprobs: the prompt comes back, the engine is idle."""
        for s in states:
            s.text, s.finish_reason = [s.prefix], "length"
        fmt = cls(request_id, model, states, None, None, echo=True, include_usage=include_usage)
        if not stream:
            return fmt.response({})

        async def events():
            for s in states:
                yield {"data": fmt.chunk([{"text": s.prefix, "index": s.index,
                                           "logprobs": None, "finish_reason": "length"}])}
            if include_usage:
                yield {"data": fmt.usage_chunk()}
            yield {"data": "[DONE]"}
        return sse_response(events(), sep="\n")


class chat_chunks(_Formatter):  # noqa: N801
    """Formats /v1/chat/completions."""

    object_name = "chat.completion.chunk"

    def _entries(self, out) -> list[dict] | None:
        if self.num_top is None:
            return None
        entries = []
        for tid, entry in zip(out.token_ids, out.logprobs or []):
            text, raw = self.token_text(tid)
            tops = []
            for t, lp in self.top(entry):
                t_text, t_raw = self.token_text(t)
                tops.append({"token": t_text, "logprob": lp, "bytes": t_raw})
            entries.append({"token": text, "logprob": entry.logprob, "bytes": raw,
                            "top_logprobs": tops})
        return entries

    def _choice(self, index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}

    async def stream(self, fan) -> AsyncIterator[str]:
        for s in self.states:  # the role delta comes first, for every choice
            yield self.chunk([self._choice(s.index, {"role": "assistant", "content": ""})])
        async for i, out in fan.outputs():
            _check(out)
            state = self.states[i]
            state.num_generated = out.num_generated_tokens
            entries = self._entries(out)
            if out.text or entries:
                yield self.chunk([self._choice(state.index, {"content": out.text},
                                               {"content": entries} if entries else None)])
            if out.finished:
                state.finish_reason = out.finish_reason
                yield self.chunk([self._choice(state.index, {}, None, out.finish_reason)])
        if self.include_usage:
            yield self.usage_chunk()

    async def collect(self, fan) -> ChatCompletionResponse:
        for s in self.states:
            s.logprobs = [] if self.num_top is not None else None
        async for i, out in fan.outputs():
            _check(out)
            state = self.states[i]
            state.text.append(out.text)
            state.num_generated = out.num_generated_tokens
            if state.logprobs is not None:
                state.logprobs.extend(self._entries(out))
            if out.finished:
                state.finish_reason = out.finish_reason
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=self.usage(),
            choices=[{"index": s.index, "finish_reason": s.finish_reason,
                      "message": {"role": "assistant", "content": "".join(s.text)},
                      "logprobs": None if s.logprobs is None else {"content": s.logprobs}}
                     for s in self.states])
