"""The HTTP API end to end: a real uvicorn server on an ephemeral port, a real AsyncEngine
around a tiny random model, driven by the official `openai` client and by raw httpx.

Relational checks throughout: streamed == non-streamed, usage == token counts, batched ==
alone, token-id prompt == string prompt. Waiting for the server's asynchronous reactions
(a disconnect, a queue filling up) polls a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from server.api import ServerSettings, build_app
from server.async_engine import AsyncEngine
from server.drain import DrainingServer
from server.engine import EngineConfig, LLMEngine, RequestOutput
from tests.conftest import make_model

MODEL = "tiny-test"
KEY = "sk-test-key"


class _Ready:
    """Mixin for a uvicorn.Server run in a background thread: `ready` is set once it listens
    (after lifespan)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.ready = threading.Event()

    async def startup(self, sockets=None):
        await super().startup(sockets)
        self.ready.set()


class _ThreadServer(_Ready, uvicorn.Server):
    pass


class _ThreadDrainingServer(_Ready, DrainingServer):
    pass


class Running:
    """A server on an ephemeral port in a thread. `draining=True` runs fanformer-serve's
    DrainingServer, whose `handle_exit(SIGTERM, None)` the tests call as the signal would."""

    def __init__(self, engine, settings, draining: bool = False, **uvicorn_config):
        self.engine = engine
        self.app = build_app(engine, settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", **uvicorn_config)
        self.server = (_ThreadDrainingServer(config, self.app.state.drain) if draining
                       else _ThreadServer(config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        assert self.server.ready.wait(60), "the server did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def make_engine(tokenizer, **config) -> AsyncEngine:
    model = make_model("test", max_seq_len=512)
    config = {"max_num_seqs": 32, "dtype": "float32", **config}
    return AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(**config)))


@pytest.fixture(scope="module")
def srv(tokenizer):
    running = Running(make_engine(tokenizer), ServerSettings(served_model_name=MODEL,
                                                             max_request_bytes=64 * 1024))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


GREEDY = {"temperature": 0, "max_tokens": 12}


# ---------------------------------------------------------------- plain endpoints
def test_models_health_version_tokenize(srv, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/version").json()["version"]
    tok = httpx.post(srv.url + "/tokenize", json={"prompt": "Alice was"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    detok = httpx.post(srv.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "Alice was"
    chat = httpx.post(srv.url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > tok["count"] - 2


def test_completion_response_shape(srv):
    r = httpx.post(srv.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "Alice", "max_tokens": 5, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert body["choices"][0].keys() == {"text", "index", "logprobs", "finish_reason"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


# ---------------------------------------------------------------- streaming
def test_stream_equals_non_stream_completions(client):
    plain = client.completions.create(model=MODEL, prompt="The Queen said", **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="The Queen said", stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_equals_non_stream_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].delta.content is None
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    assert plain.object == "chat.completion" and chunks[1].object == "chat.completion.chunk"


def test_raw_sse_framing_and_include_usage(srv):
    tokens = httpx.post(srv.url + "/tokenize", json={"prompt": "Down the"}).json()["count"]
    request = {"model": MODEL, "prompt": "Down the", "max_tokens": 7, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", srv.url + "/v1/completions", json=request) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and "\r" not in raw
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": tokens, "completion_tokens": 7,
                                   "total_tokens": tokens + 7}


def test_chat_include_usage_matches_non_stream(client):
    messages = [{"role": "user", "content": "Alice"}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 6,
              "extra_body": {"ignore_eos": True}, "temperature": 0}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert plain.usage.completion_tokens == 6


# ---------------------------------------------------------------- prompts, n, logprobs
def test_prompt_shapes_and_choice_indices(srv, client):
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "Alice"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="Alice", **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["Alice", "Rabbit"], n=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    lists = client.completions.create(model=MODEL, prompt=[ids, ids], **GREEDY)
    assert [c.text for c in lists.choices] == [by_text.choices[0].text] * 2
    streamed = list(client.completions.create(model=MODEL, prompt=["Alice", "Rabbit"], n=2,
                                              stream=True, **GREEDY))
    for index, choice in enumerate(many.choices):
        text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == index)
        assert text == choice.text


def test_seed_makes_sampling_reproducible(client):
    kwargs = {"model": MODEL, "prompt": "Alice", "max_tokens": 10, "temperature": 1.0,
              "seed": 7, "n": 2}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_echo_scoring_returns_prompt_logprobs(srv):
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "Alice was tired"}).json()["tokens"]
    body = httpx.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": "Alice was tired", "max_tokens": 0, "echo": True,
        "logprobs": 1}).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "Alice was tired"
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == "Alice was tired"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert body["usage"]["completion_tokens"] == 0
    echo_only = httpx.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": "Alice", "max_tokens": 0, "echo": True}).json()
    assert echo_only["choices"][0]["text"] == "Alice"


def test_logprobs_shapes(client):
    out = client.completions.create(model=MODEL, prompt="Alice", logprobs=3, max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                                  "Hi"}],
                                          logprobs=True, top_logprobs=2, max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy = best
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
    ({}, "prompt"),
])
def test_invalid_requests_are_400_with_openai_body(srv, body, param):
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_error_statuses(srv, client):
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(srv.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Alice", max_tokens=600)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user",
                                                                 "content": "x"}])


def test_unknown_fields_are_ignored(srv):
    r = httpx.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": "Alice", "max_tokens": 2, "frobnicate": 3})
    assert r.status_code == 200


def test_error_after_stream_started_is_an_event(srv, monkeypatch):
    real = srv.engine.generate

    async def failing(prompt_ids, params, request_id=None):
        async for out in real(prompt_ids, params, request_id):
            yield out
            yield RequestOutput(out.request_id, "", [], None, out.prompt_token_ids, None,
                                out.num_generated_tokens, True, "error", "boom")
            return
    monkeypatch.setattr(srv.engine, "generate", failing)
    with httpx.stream("POST", srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": "Alice", "stream": True, "max_tokens": 5}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert json.loads(events[-2])["error"]["message"] == "boom"
    assert events[-1] == "[DONE]"
    monkeypatch.undo()
    wait_until(lambda: srv.engine.stats().num_running == 0)


def test_500_hides_the_stack_trace(srv, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(srv.engine, "generate", broken)
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Alice"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text


# ---------------------------------------------------------------- disconnects, concurrency
def test_disconnect_mid_stream_frees_the_cache(srv):
    aborted = metric(srv.url, "vllm:request_success_total", finished_reason="abort")
    with httpx.stream("POST", srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": "Alice", "stream": True, "max_tokens": 480,
            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert srv.engine.stats().num_running == 1
        steps = srv.engine.stats().num_steps
    wait_until(lambda: srv.engine.stats().num_running == 0)
    assert srv.engine.stats().num_steps - steps < 240  # aborted, not run to its 480 tokens
    assert srv.engine.stats().kv_cache_usage == 0
    assert metric(srv.url, "vllm:request_success_total",
                  finished_reason="abort") == aborted + 1
    assert metric(srv.url, "vllm:num_requests_running") == 0


def test_32_concurrent_streams_each_match_alone(srv):
    prompts = [f"Alice number {i} said" for i in range(32)]
    params = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    sync = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
    alone = [sync.completions.create(prompt=p, **params).choices[0].text for p in prompts]

    async def one(aclient, prompt):
        text = ""
        async for chunk in await aclient.completions.create(prompt=prompt, stream=True,
                                                            **params):
            text += chunk.choices[0].text
        return text

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="EMPTY",
                                      max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
    assert asyncio.run(all_at_once()) == alone
    assert metric(srv.url, "vllm:time_to_first_token_seconds_count") >= 32


def test_truncate_prompt_tokens_is_honoured(srv, client, tokenizer):
    ids = tokenizer.encode("Alice was beginning to get very tired of sitting by her sister")
    tail = client.completions.create(model=MODEL, prompt=ids[-4:], **GREEDY)
    cut = client.completions.create(model=MODEL, prompt=tokenizer.decode(ids), **GREEDY,
                                    extra_body={"truncate_prompt_tokens": 4})
    assert cut.usage.prompt_tokens == 4 and cut.choices[0].text == tail.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Alice " * 50}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": 7})
    assert chat.usage.prompt_tokens == 7
    with pytest.raises(openai.BadRequestError, match="greater than max_model_len"):
        client.completions.create(model=MODEL, prompt="Alice", max_tokens=1,
                                  extra_body={"truncate_prompt_tokens": 100000})


#: What vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana) and common alerts
#: query; each must be a series here, labelled with the model name.
VLLM_DASHBOARD_SERIES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total", "vllm:num_preemptions_total",
    "vllm:request_decode_time_seconds_bucket")


def test_metrics_carry_vllm_names_and_process_series(srv, client):
    before = metric(srv.url, "vllm:prompt_tokens_total", model_name=MODEL)
    generated = metric(srv.url, "vllm:generation_tokens_total", model_name=MODEL)
    done = metric(srv.url, "vllm:request_success_total", finished_reason="length")
    usage = client.completions.create(model=MODEL, prompt="Alice was", max_tokens=5,
                                      extra_body={"ignore_eos": True}).usage
    assert metric(srv.url, "vllm:prompt_tokens_total") == before + usage.prompt_tokens
    assert metric(srv.url, "vllm:generation_tokens_total") == generated + 5
    assert metric(srv.url, "vllm:request_success_total", finished_reason="length") == done + 1
    for name in VLLM_DASHBOARD_SERIES:
        metric(srv.url, name, model_name=MODEL)  # raises when absent
    text = httpx.get(srv.url + "/metrics").text
    assert "_created" not in text and "fanformer_" not in text
    for line in ("process_resident_memory_bytes ", "process_cpu_seconds_total "):
        assert any(x.startswith(line) for x in text.splitlines()), line


# ---------------------------------------------------------------- auth, overload
@pytest.fixture(scope="module")
def small(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=1, max_queue_len=1),
                      ServerSettings(served_model_name=MODEL, api_key=KEY, retry_after_s=2))
    yield running
    running.stop()


def test_api_key(small):
    ok = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="Alice", max_tokens=2).choices
    bad = openai.OpenAI(base_url=small.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="Alice", max_tokens=2)
    assert e.value.code == "invalid_api_key"
    r = httpx.get(small.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(small.url + "/health").status_code == 200
    assert httpx.get(small.url + "/metrics").status_code == 200


def test_full_queue_is_429_with_retry_after(small):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": MODEL, "prompt": "Alice", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    queued = []
    waiting = threading.Thread(target=lambda: queued.append(httpx.post(
        small.url + "/v1/completions", headers=headers, timeout=60,
        json={**long, "stream": False, "max_tokens": 2})))
    with httpx.Client(headers=headers, timeout=60) as http, \
            http.stream("POST", small.url + "/v1/completions", json=long) as running:
        assert running.status_code == 200  # holds the only slot
        waiting.start()
        wait_until(lambda: metric(small.url, "vllm:num_requests_waiting") == 1)
        refused = http.post(small.url + "/v1/completions", json={**long, "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        client = openai.OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="Alice", max_tokens=2)
    waiting.join(60)
    assert queued[0].status_code == 200  # it ran once the slot was free
    wait_until(lambda: metric(small.url, "vllm:num_requests_running") == 0)


# ---------------------------------------------------------------- the command
def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def free_port() -> int:
    """A loopback port free now (for a server in another process to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(checkpoint_dir, *args: str, **popen) -> tuple[subprocess.Popen, str]:
    """`fanformer-serve` on a free loopback port in a subprocess -> (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--checkpoint",
                             str(checkpoint_dir), "--port", str(port), "--dtype", "float32",
                             *args], text=True, **popen)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    """Until a spawned server answers /health with 200 (failing at once if it exited)."""
    def healthy():
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(healthy, timeout=60)


def test_malloc_arenas_are_capped_unless_the_user_chose(monkeypatch):
    from server.cli import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas()  # the user's choice stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver())
    assert limit_malloc_arenas() == glibc


def test_freed_blocks_are_reused_unless_the_user_chose(monkeypatch):
    from server.cli import reuse_freed_blocks

    for name, value in [("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")]:
        monkeypatch.setenv(name, value)
        assert not reuse_freed_blocks(), name  # the user's choice stands
        monkeypatch.delenv(name)
    glibc = sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver())
    assert reuse_freed_blocks() == glibc


def test_idle_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    from server.cli import idle_threads_sleep

    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not idle_threads_sleep() and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert idle_threads_sleep() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    # libgomp reads it when torch loads: main() must run before anything imports torch
    loaded = subprocess.run([sys.executable, "-c", "import sys, server.cli; "
                             "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    result = run_cli("--checkpoint", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.startswith("fanformer-serve: ") and len(result.stderr.splitlines()) == 1


def test_disconnect_while_queued_leaves_the_queue(small):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": MODEL, "prompt": "Alice", "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    body = json.dumps({**long, "stream": False, "max_tokens": 2}).encode()
    aborted = metric(small.url, "vllm:request_success_total", finished_reason="abort")
    finished = metric(small.url, "vllm:request_success_total", finished_reason="length")
    with httpx.Client(headers=headers, timeout=60) as http, \
            http.stream("POST", small.url + "/v1/completions", json=long) as running:
        assert running.status_code == 200  # holds the only slot
        host, port = small.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nAuthorization: Bearer " +
                        KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                        b"\r\n\r\n" + body)
            wait_until(lambda: small.engine.stats().num_waiting == 1)
        wait_until(lambda: metric(small.url, "vllm:request_success_total",
                                  finished_reason="abort") == aborted + 1)
        # aborted while still queued: nothing has finished meanwhile (the stream still runs)
        assert metric(small.url, "vllm:request_success_total",
                      finished_reason="length") == finished
        assert small.engine.stats().num_waiting == 0
    wait_until(lambda: small.engine.stats().num_running == 0)


def test_health_is_503_until_started_and_after_death(tokenizer):
    engine = make_engine(tokenizer, max_num_seqs=1)
    app = build_app(engine, ServerSettings(served_model_name=MODEL, cors_origins=("*",),
                                           api_key=KEY))

    async def probe():
        transport = httpx.ASGITransport(app=app)  # no lifespan: the engine never starts
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            loading = await http.get("/health")
            engine.is_running, engine.is_dead = True, True
            dead = await http.get("/health")
            preflight = await http.options("/v1/completions", headers={
                "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,x-stainless-os"})
            return loading, dead, preflight
    loading, dead, preflight = asyncio.run(probe())
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "not_ready"
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"
    assert preflight.status_code == 200  # CORS preflights need no key
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_cli_load_reads_quantization_from_the_checkpoint_not_its_name(tmp_path, tokenizer):
    from fanformer.checkpoint import save_checkpoint
    from quant.config import QuantConfig
    from quant.convert import block_linears, save_quantized
    from quant.int8 import quantize_rtn
    from quant.layers import GPTQLinear
    from server.cli import load

    model = make_model("test")
    names = block_linears(model)
    quantize_rtn(model, names, 4, 128, True)
    save_quantized(tmp_path / "plain-name", model, tokenizer, QuantConfig(method="rtn", bits=4))
    quantized, _, name = load(str(tmp_path / "plain-name"), "cpu", "float32")
    assert isinstance(quantized.get_submodule(names[0]), GPTQLinear) and name == "plain-name"
    save_checkpoint(tmp_path / "model-gptq-4bit", make_model("test"), tokenizer)
    plain, _, _ = load(str(tmp_path / "model-gptq-4bit"), "cpu", "float32")
    assert not isinstance(plain.get_submodule(names[0]), GPTQLinear)
