"""The wire format without a server: request validation, to_sampling_params, the chat
template, token bytes, chunk sequences and the error mapping. Milliseconds, no model."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from server.api import engine_error
from server.engine import EngineDeadError, QueueFullError, RequestTooLongError
from server.openai_format import ChoiceState, GenerationFailed, chat_chunks, completion_chunks
from server.protocol import ChatCompletionRequest, CompletionRequest, TokenText


def test_completion_defaults_follow_openai():
    params = CompletionRequest(prompt="hi").to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (16, 1.0, 1.0, 1)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (0, 0.0, 1.0)
    assert params.logprobs is None and params.prompt_logprobs is None and params.stop == []
    assert CompletionRequest(prompt="hi", max_tokens=None).to_sampling_params().max_tokens == 16


def test_completion_fields_map_onto_sampling_params():
    req = CompletionRequest(
        prompt="hi", max_tokens=5, temperature=0, top_p=0.5, n=3, stop="\n", logprobs=2,
        echo=True, presence_penalty=1, frequency_penalty=-1, logit_bias={"7": -100, "9": 5},
        seed=3, top_k=40, min_p=0.1, repetition_penalty=1.2, min_tokens=2,
        stop_token_ids=[4], ignore_eos=True)
    p = req.to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.seed) == (5, 0.0, 0.5, 3, 3)
    assert p.stop == ["\n"] and p.stop_token_ids == [4] and p.ignore_eos
    assert p.logprobs == 2 and p.prompt_logprobs == 2  # echo + logprobs scores the prompt
    assert p.logit_bias == {7: -100.0, 9: 5.0}
    assert (p.presence_penalty, p.frequency_penalty) == (1.0, -1.0)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (40, 0.1, 1.2, 2)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a", ["a"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2], [[1, 2]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_four_prompt_shapes(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("body", [
    {"prompt": [True, 2]},
    {"prompt": ["a", [1]]},
    {"prompt": ""},
    {"prompt": [[]]},
    {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]},
    {"prompt": "a", "stream_options": {"include_usage": True}},
    {"prompt": "a", "suffix": "b"},
    {"prompt": "a", "best_of": 3},
    {"prompt": "a", "logprobs": 6},
    {"prompt": "a", "temperature": -0.1},
    {"prompt": "a", "logit_bias": {"x": 1}},
    {"prompt": "a", "logit_bias": {"1": 101}},
    {"prompt": "a", "seed": 2**64},
])
def test_invalid_completion_requests(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_unknown_fields_are_ignored_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="server.protocol"):
        req = CompletionRequest(prompt="a", frobnicate=1)
    assert req.to_sampling_params().max_tokens == 16
    assert "frobnicate" in caplog.text


def test_chat_request_conversion(tokenizer):
    req = ChatCompletionRequest(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                     {"type": "text", "text": "there"}]}],
        max_tokens=9, max_completion_tokens=5, logprobs=True, top_logprobs=3)
    assert req.message_dicts()[1] == {"role": "user", "content": "Hi there"}
    p = req.to_sampling_params(100, stop_token_ids=[tokenizer.im_end_id])
    assert p.max_tokens == 5 and p.logprobs == 3 and p.stop_token_ids == [tokenizer.im_end_id]
    assert ChatCompletionRequest(messages=req.messages).to_sampling_params(42).max_tokens == 42
    text = tokenizer.apply_chat_template(req.message_dicts())
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.im_start_id in tokenizer.encode(text)


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
])
def test_invalid_chat_requests(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**body)


def test_token_bytes_are_exact(tokenizer):
    text = "Alice héllo 世界 🙂 <|endoftext|>"
    token_text = TokenText(tokenizer)
    ids = tokenizer.encode(text)
    assert bytes(b for i in ids for b in token_text(i)[1]) == text.encode()


# ---------------------------------------------------------------- chunk sequences
@dataclass
class Out:
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list | None = None
    num_generated_tokens: int = 0
    error: str | None = None


class FakeFan:
    def __init__(self, outputs):
        self.items = outputs

    async def outputs(self):
        for item in self.items:
            yield item


def run_stream(fmt, outputs) -> list[dict]:
    async def go():
        return [json.loads(c) async for c in fmt.stream(FakeFan(outputs))]
    return asyncio.run(go())


def test_completion_chunks_echo_and_finish(tokenizer):
    states = [ChoiceState(0, "Hi", [1, 2])]
    fmt = completion_chunks("cmpl-1", "m", states, TokenText(tokenizer), logprobs=None,
                            echo=True, include_usage=True)
    chunks = run_stream(fmt, [(0, Out(" a", [5], num_generated_tokens=1)),
                              (0, Out(" b", [6], True, "stop", num_generated_tokens=2))])
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["Hi a", " b"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:2]] == [None, "stop"]
    assert all(c["usage"] is None and c["id"] == "cmpl-1" for c in chunks[:2])
    assert chunks[2]["choices"] == [] and chunks[2]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_chat_chunks_role_first_then_content_then_empty_delta(tokenizer):
    states = [ChoiceState(0, "", [1]), ChoiceState(1, "", [1])]
    fmt = chat_chunks("chatcmpl-1", "m", states, TokenText(tokenizer), logprobs=None,
                      include_usage=False)
    chunks = run_stream(fmt, [(0, Out("He", [5], num_generated_tokens=1)),
                              (1, Out("Yo", [7], True, "length", num_generated_tokens=1)),
                              (0, Out("", [2], True, "stop", num_generated_tokens=2))])
    choices = [c["choices"][0] for c in chunks]
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""},
        {"content": "He"}, {"content": "Yo"}, {}, {}]
    assert [(c["index"], c["finish_reason"]) for c in choices[4:]] == [(1, "length"),
                                                                         (0, "stop")]
    assert all("usage" not in c for c in chunks)


def test_failed_generation_raises_for_the_error_event(tokenizer):
    fmt = chat_chunks("x", "m", [ChoiceState(0, "", [1])], TokenText(tokenizer), None, False)
    with pytest.raises(GenerationFailed, match="boom"):
        run_stream(fmt, [(0, Out("", [], True, "error", error="boom"))])


def test_engine_errors_map_to_statuses():
    full = engine_error(QueueFullError("64 waiting"), "prompt", retry_after_s=3)
    assert full.status == 429 and full.headers["Retry-After"] == "3"
    long = engine_error(RequestTooLongError("too long"), "messages")
    assert long.status == 400 and long.body["error"]["code"] == "context_length_exceeded"
    assert long.body["error"]["param"] == "messages"
    assert engine_error(ValueError("top_p must be in (0, 1]"), "prompt").status == 400
    assert engine_error(EngineDeadError("dead"), "prompt").status == 503
    bug = engine_error(KeyError("secret detail"), "prompt")
    assert bug.status == 500 and "secret" not in json.dumps(bug.body)
    assert engine_error(GenerationFailed("abort", "aborted"), "prompt").status == 503


def test_truncate_prompt_tokens_keeps_the_last_k():
    ids = list(range(10))
    assert CompletionRequest(prompt="x").truncate(ids, 8) == ids
    assert CompletionRequest(prompt="x", truncate_prompt_tokens=3).truncate(ids, 8) == [7, 8, 9]
    assert CompletionRequest(prompt="x", truncate_prompt_tokens=-1).truncate(ids, 8) == ids[2:]
    with pytest.raises(ValueError, match="greater than max_model_len"):
        CompletionRequest(prompt="x", truncate_prompt_tokens=9).truncate(ids, 8)
    for bad in (0, -2):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt="x", truncate_prompt_tokens=bad)
