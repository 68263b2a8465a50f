"""Hostile input against a real server (uvicorn on an ephemeral port, a tiny random model):
hand-written cases (wrong types, huge/negative/NaN/inf numbers, empty and enormous prompts,
invalid UTF-8, out-of-range token ids, deeply nested JSON, an oversized body, a prompt longer
than the context, an unknown model) and a hypothesis fuzzer that posts random JSON built from
the fields the server's own OpenAPI schema lists. The contract checked: never a 5xx, every
rejection an OpenAI-shaped error body, and /health still 200 afterwards.

The server and its helpers come from tests/test_api.py (imported, not copied).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api import ServerSettings
from tests.test_api import MODEL, Running, make_engine, wait_until

LIMIT = 64 * 1024
ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


@pytest.fixture(scope="module")
def srv(tokenizer):
    running = Running(make_engine(tokenizer), ServerSettings(served_model_name=MODEL,
                                                             max_request_bytes=LIMIT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def assert_openai_error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Alice", "max_tokens": 2}
HOSTILE_FIELDS = [
    ("temperature", "hot"), ("temperature", -1), ("temperature", float("inf")),
    ("temperature", float("nan")), ("top_p", float("nan")), ("top_p", -0.5),
    ("max_tokens", -1), ("max_tokens", 10**30), ("max_tokens", 2**63), ("max_tokens", 2.5),
    ("max_tokens", "many"), ("n", 10**6), ("n", -3), ("n", "two"), ("seed", 2**64),
    ("seed", float("inf")), ("logprobs", -1), ("top_k", -7), ("min_p", float("nan")),
    ("repetition_penalty", 0), ("presence_penalty", float("-inf")), ("stop", 5),
    ("stop", [["nested"]]), ("stream", "maybe"), ("stream_options", "x"), ("logit_bias", [1]),
    ("logit_bias", {"99999999": 1}), ("logit_bias", {"1": float("nan")}), ("min_tokens", -1),
    ("model", 42), ("model", "gpt-4"),
]


@pytest.mark.parametrize(("key", "value"), HOSTILE_FIELDS, ids=lambda x: repr(x)[:20])
@pytest.mark.parametrize("base", [COMPLETION, CHAT], ids=["completions", "chat"])
def test_hostile_field_values_are_4xx(http, base, key, value):
    route = "/v1/completions" if "prompt" in base else "/v1/chat/completions"
    body = json.dumps({**base, key: value})  # NaN/Infinity as Python's json writes them
    r = http.post(route, content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, 404)


@pytest.mark.parametrize(("key", "value"), [("max_tokens", "2"), ("n", True),
                                            ("stream", "yes"), ("temperature", "0")])
def test_lax_coercions_are_accepted(http, key, value):
    """pydantic's lax mode, as in vLLM: a numeric string or a bool where a number goes."""
    r = http.post("/v1/completions", json={**COMPLETION, key: value})
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("temperature", [1e-80, 5e-324, 1e-6])
def test_tiny_temperature_is_greedy_not_a_500(http, temperature):
    """Found by the long fuzz run: logits / 1e-80 overflowed to inf, then NaN probabilities."""
    greedy = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 6,
                                                "temperature": 0})
    tiny = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 6,
                                              "temperature": temperature})
    assert tiny.status_code == 200, tiny.text[:300]
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("prompt", [
    "", [], [""], [[]], 5, None, {"a": 1}, [1, "a"], [True, False], [-1], [2**31], [2**64],
    [1.5], [[1], "a"], ["a"] * 10_000, [[0] * 600],
], ids=lambda x: repr(x)[:20])
def test_hostile_prompts_are_400(http, prompt):
    assert_openai_error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}),
                        400)


def test_prompt_longer_than_the_context(http, srv):
    ids = [1] * 513  # the test model's context is 512
    error = assert_openai_error(http.post("/v1/completions", json={**COMPLETION,
                                                                   "prompt": ids}), 400)
    assert error["code"] == "context_length_exceeded"
    text = "Alice " * 2000  # well under the body limit, far over the context in tokens
    for route, body in [("/v1/completions", {**COMPLETION, "prompt": text}),
                        ("/v1/chat/completions", {**CHAT, "messages": [
                            {"role": "user", "content": text}]})]:
        error = assert_openai_error(http.post(route, json=body), 400)
        assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("messages", [
    [], None, "hi", [{"role": "wizard", "content": "x"}],
    [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url",
                                                                     "image_url": "x"}]}],
    [{"content": "x"}], [[]],
], ids=lambda x: repr(x)[:20])
def test_hostile_messages_are_400(http, messages):
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}),
                        400)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("raw", [
    b"", b"null", b"[]", b"42", b'"str"', b"{", b"\xff\xfe\xfd", b'{"prompt": "\xff\xc3"}',
    b'{"prompt": "\\ud800"}', nested(10_000).encode(), b'{"a":' * 5000 + b"1" + b"}" * 5000,
], ids=lambda x: repr(x)[:16])
def test_malformed_bodies_are_4xx(http, route, raw):
    r = http.post(route, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, 404, 413)


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_the_limit_is_413(http, srv, route):
    r = http.post(route, json={"prompt": "x" * (LIMIT + 1)})
    assert assert_openai_error(r, 413)["code"] == "request_too_large"
    # a chunked body (no content-length) is counted as it arrives
    chunks = iter([b'{"prompt": "', b"y" * LIMIT, b'"}'])
    r = http.post(route, content=chunks, headers={"content-type": "application/json"})
    assert assert_openai_error(r, 413)["code"] == "request_too_large"


def test_detokenize_out_of_range_and_unknown_model(http):
    for tokens in ([-1], [10**9], [2**64], ["a"], None):
        assert_openai_error(http.post("/detokenize", json={"tokens": tokens}), 400)
    error = assert_openai_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}),
                                404)
    assert error["code"] == "model_not_found"
    assert_openai_error(http.get("/v1/models/" + "x" * 5000), 404)


def test_invalid_utf8_text_never_5xx(http):
    """Lone surrogates and odd code points that survive JSON parsing reach the tokenizer."""
    for text in ["\ud800", "a\udfffb", "\x00" * 50, "\U0010ffff", "\u202e" * 10]:
        body = json.dumps({**COMPLETION, "prompt": text})
        r = http.post("/v1/completions", content=body,
                      headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text[:300]
        r = http.post("/tokenize", content=json.dumps({"prompt": text}),
                      headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text[:300]


# ---------------------------------------------------------------- fuzzing from the schema
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
SMALL_TOKENS = st.sampled_from([None, -1, 0, 1, 3, 2**63, "3", 1.5, True])


def schema_fields(schema: dict) -> dict[str, list[str]]:
    """{route: the property names of its JSON request body} from the OpenAPI document."""
    components = schema["components"]["schemas"]
    fields = {}
    for route in ROUTES:
        ref = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["$ref"]
        fields[route] = sorted(components[ref.rsplit("/", 1)[1]]["properties"])
    return fields


@pytest.fixture(scope="module")
def fields(http):
    return schema_fields(http.get("/openapi.json").json())


def test_schema_lists_the_fields(fields):
    assert "prompt" in fields["/v1/completions"] and "messages" in fields[
        "/v1/chat/completions"]


def fuzz_once(http: httpx.Client, fields: dict[str, list[str]], data) -> None:
    """Post one random body built from a route's schema fields: never a 5xx."""
    route = data.draw(st.sampled_from(ROUTES))
    keys = data.draw(st.lists(st.sampled_from(fields[route]), unique=True, max_size=8))
    body = {k: data.draw(JSON) for k in keys}
    valid_base = data.draw(st.booleans())  # half the time, start from a valid request
    if valid_base and route == "/v1/completions":
        body = {**COMPLETION, **body}
    elif valid_base and route == "/v1/chat/completions":
        body = {**CHAT, **body}
    for bound in ("max_tokens", "max_completion_tokens", "n"):  # keep the CI cost bounded
        if bound in body:
            body[bound] = data.draw(SMALL_TOKENS)
    r = http.post(route, content=json.dumps(body),
                  headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)


FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow]}


@settings(max_examples=150, derandomize=True, **FUZZ)
@given(data=st.data())
def test_fuzz_schema_fields_never_5xx(http, fields, data):
    fuzz_once(http, fields, data)


@pytest.mark.slow
@settings(max_examples=5000, **FUZZ)
@given(data=st.data())
def test_fuzz_schema_fields_never_5xx_long(http, fields, data):
    """The long run (random seed each time): `pytest -m slow tests/test_hostile_input.py`."""
    fuzz_once(http, fields, data)


def test_still_healthy_afterwards(http, srv):
    """Runs last in this module: nothing above left the server unhealthy or holding slots."""
    assert http.get("/health").status_code == 200
    wait_until(lambda: srv.engine.stats().num_running == 0)
    assert srv.engine.stats().kv_cache_usage == 0
    r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
