"""Schema-driven fuzzing with schemathesis: every operation in the server's own
`/openapi.json`, with bodies generated from the schema, both valid ones (positive mode) and
ones that break it on purpose (negative mode), sent over HTTP to a real server (uvicorn on
an ephemeral port, a tiny random model). The contract: never a 5xx, every 4xx an
OpenAI-shaped error, every 200 JSON or an SSE stream that ends with [DONE]; afterwards the
server is healthy and idle. CI runs a few examples per operation and mode; the `slow`
variant runs many more (docs/RELIABILITY.md has its last result).
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from server.api import ServerSettings
from tests.test_api import MODEL, Running, make_engine, wait_until

COMMON = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None}
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def fuzzed(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=8, max_model_len=128),
                      ServerSettings(served_model_name=MODEL, max_request_bytes=64 * 1024))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def operations(fuzzed) -> list:
    # schemathesis stops reading a stream after 20 events by default; read ours to the end
    config = SchemathesisConfig.from_dict({"max-stream-events": 10_000})
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", config=config)
    found = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in found} >= {"/v1/completions", "/v1/chat/completions",
                                        "/v1/models", "/tokenize", "/detokenize"}
    return found


def pin_model(case):
    """Valid bodies name the served model (else every one is a 404 and sampling goes
    untested)."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    return case


def check(case, base_url: str) -> int:
    response = case.call(base_url=base_url, timeout=60)
    status, body = response.status_code, response.content
    assert status < 500, (case.operation.label, case.body, status, body[:300])
    if status >= 400:
        error = response.json()["error"]
        assert error.keys() == {"message", "type", "param", "code"}, body[:300]
        assert isinstance(error["message"], str) and error["message"]
    elif "text/event-stream" in str(response.headers.get("content-type")):
        assert body.rstrip().endswith(b"data: [DONE]"), body[-300:]
    elif case.operation.path != "/metrics":
        response.json()
    return status


def fuzz(operations: list, base_url: str, mode: GenerationMode, examples: int,
         derandomize: bool = True) -> dict[str, Counter]:
    """Each operation's generated cases in turn (schemathesis' strategies under plain
    hypothesis: its pytest plugin does not run under pytest 9) -> statuses per operation."""
    statuses: dict[str, Counter] = {}
    for operation in operations:
        seen = statuses.setdefault(operation.label, Counter())
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE:
            strategy = strategy.map(pin_model)
        parameters = list(operation.iter_parameters())
        has_body = bool(operation.get_request_payload_content_types())
        if mode is GenerationMode.NEGATIVE and not parameters and not has_body:
            continue  # GET /v1/models, /health, ...: nothing to make invalid

        @settings(max_examples=examples, derandomize=derandomize, **COMMON)
        @given(strategy)
        def run(case):
            seen[check(case, base_url)] += 1  # noqa: B023 - run() is called right here
        try:
            run()
        except Unsatisfiable:  # only a free-form string path parameter: nothing invalid
            assert mode is GenerationMode.NEGATIVE and len(parameters) == 1 and not has_body, \
                operation.label
    return statuses


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_schemathesis_never_5xx(fuzzed, operations, mode):
    statuses = fuzz(operations, fuzzed.url, mode, examples=30)
    if mode is GenerationMode.POSITIVE:  # valid bodies reach the engine, not only errors
        assert statuses["POST /v1/completions"][200] > 0, statuses
        assert statuses["POST /v1/chat/completions"][200] > 0, statuses


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_schemathesis_never_5xx_long(fuzzed, operations, mode):
    statuses = fuzz(operations, fuzzed.url, mode, examples=500, derandomize=False)
    print(f"{mode.value}: {sum(sum(c.values()) for c in statuses.values())} requests; "
          + "; ".join(f"{op} {dict(c)}" for op, c in statuses.items()))


def test_still_healthy_and_idle_afterwards(fuzzed):
    assert httpx.get(fuzzed.url + "/health", timeout=30).status_code == 200
    wait_until(lambda: fuzzed.engine.stats().num_running == 0, timeout=60)
    assert fuzzed.engine.stats().num_waiting == 0
