"""Overload and faults against a real server (uvicorn on an ephemeral port, a tiny model).

Overload: with one slot and a queue of two, every client beyond them gets a 429 with
Retry-After while the admitted ones still run, and those finish unaffected; the official
`openai` client, retrying, then succeeds. Faults: an exception inside one request's sampling
fails that request alone (an error event when streaming, a 500 otherwise) while the others
complete; a failed batched forward kills the engine and /health turns 503.

Servers and helpers come from tests/test_api.py (imported, not copied).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import server.sampling
from server.api import ServerSettings
from tests.test_api import MODEL, Running, make_engine, sse_events, wait_until

LONG = {"model": MODEL, "prompt": "Alice", "max_tokens": 480, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def tight(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=1, max_queue_len=2),
                      ServerSettings(served_model_name=MODEL, retry_after_s=1))
    yield running
    running.stop()


def test_overload_is_429_and_admitted_requests_are_unaffected(tight):
    alone = httpx.post(tight.url + "/v1/completions", json={**LONG, "max_tokens": 20},
                       timeout=60).json()["choices"][0]["text"]
    queued: list[httpx.Response] = []
    statuses: list[int] = []
    retrying = openai.OpenAI(base_url=tight.url + "/v1", api_key="EMPTY", max_retries=8,
                             http_client=httpx.Client(timeout=60, event_hooks={"response": [
                                 lambda r: statuses.append(r.status_code)]}))
    retried: list = []
    with httpx.Client(base_url=tight.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json={
                **LONG, "stream": True, "stream_options": {"include_usage": True}}) as running:
        lines = running.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # holds the slot
        waiters = [threading.Thread(target=lambda: queued.append(httpx.post(
            tight.url + "/v1/completions", json={**LONG, "max_tokens": 20}, timeout=60)))
            for _ in range(2)]
        for w in waiters:
            w.start()
        wait_until(lambda: tight.engine.stats().num_waiting == 2)
        with ThreadPoolExecutor(8) as pool:
            refused = list(pool.map(lambda _: httpx.post(
                tight.url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60),
                range(8)))
        assert tight.engine.stats().num_running == 1  # refused while the stream still runs
        for r in refused:
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        client_thread = threading.Thread(target=lambda: retried.append(
            retrying.completions.create(model=MODEL, prompt="Alice", max_tokens=3)))
        client_thread.start()
        wait_until(lambda: 429 in statuses)  # the openai client was refused at least once
        events = [line[6:] for line in lines if line.startswith("data: ")]
    for w in waiters:
        w.join(60)
    client_thread.join(60)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]  # ran to the end
    assert [r.status_code for r in queued] == [200, 200]
    assert all(r.json()["choices"][0]["text"] == alone for r in queued)  # unaffected
    assert retried and retried[0].choices[0].text is not None and statuses[-1] == 200
    wait_until(lambda: tight.engine.stats().num_running == 0)


@pytest.fixture(scope="module")
def roomy(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=8), ServerSettings(
        served_model_name=MODEL))
    yield running
    running.stop()


POISON_SEED = 666


def test_sampling_exception_fails_that_request_alone(roomy, monkeypatch):
    real_uniform = server.sampling._row_uniforms

    def uniform(request):
        if request.params.seed == POISON_SEED and len(request.output_ids) == 3:
            raise RuntimeError("injected sampling fault")
        return real_uniform(request)
    healthy = {"model": MODEL, "prompt": "Alice", "max_tokens": 12, "ignore_eos": True,
               "temperature": 0.8, "seed": 1}
    poisoned = {**healthy, "seed": POISON_SEED}
    with httpx.Client(base_url=roomy.url, timeout=60) as http:
        before = [http.post("/v1/completions", json=healthy).json() for _ in range(3)]
        monkeypatch.setattr(server.sampling, "_row_uniforms", uniform)

        def stream_poisoned():
            with http.stream("POST", "/v1/completions", json={**poisoned,
                                                              "stream": True}) as r:
                return r.status_code, sse_events(r)
        with ThreadPoolExecutor(6) as pool:
            others = [pool.submit(http.post, "/v1/completions", json=healthy)
                      for _ in range(3)]
            streamed = pool.submit(stream_poisoned)
            plain = pool.submit(http.post, "/v1/completions", json=poisoned)
            others = [f.result() for f in others]
            status, events = streamed.result()
            plain = plain.result()
        monkeypatch.undo()
        assert status == 200 and events[-1] == "[DONE]"
        assert "injected sampling fault" in json.loads(events[-2])["error"]["message"]
        assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
        assert [o.json()["choices"] for o in others] == [b["choices"] for b in before]
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json=poisoned).status_code == 200  # fault gone
    wait_until(lambda: roomy.engine.stats().num_running == 0)
    assert roomy.engine.stats().kv_cache_usage == 0


def test_failed_engine_makes_health_503(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=2),
                      ServerSettings(served_model_name=MODEL))
    try:
        def broken_forward(*args, **kwargs):
            raise RuntimeError("injected forward fault")
        running.engine.engine._forward = broken_forward
        with httpx.Client(base_url=running.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Alice",
                                                   "max_tokens": 3})
            assert r.status_code >= 500 and r.json()["error"]["type"] == "server_error"
            wait_until(lambda: running.engine.is_dead)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            after = http.post("/v1/completions", json={"model": MODEL, "prompt": "Alice"})
            assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"
    finally:
        running.stop()
