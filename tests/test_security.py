"""Security properties of the HTTP server: the API key guards every /v1/* route (and the
tokenizer routes) and is compared in constant time; the default bind is loopback; CORS is
off unless configured; no route takes a file path; the key never reaches the logs (checked
on the real `fanformer-serve` process at debug level, with right and wrong keys sent).

Servers and helpers come from tests/test_api.py (imported, not copied).
"""

from __future__ import annotations

import inspect
import subprocess

import httpx
import pytest

import server.api
from server.api import ServerSettings
from server.cli import build_parser
from tests.test_api import (
    KEY,
    MODEL,
    Running,
    make_engine,
    spawn_server,
    wait_healthy,
)

WRONG = ["", "Bearer", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", KEY,
         f"bearer {KEY}", f"Basic {KEY}", f"Bearer  {KEY}", "Bearer sk-" + "a" * 5000]


@pytest.fixture(scope="module")
def keyed(tokenizer):
    running = Running(make_engine(tokenizer, max_num_seqs=2),
                      ServerSettings(served_model_name=MODEL, api_key=KEY))
    yield running
    running.stop()


def guarded_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route that must need the key: /v1/* plus the tokenizer's."""
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            for method in sorted(route.methods - {"HEAD"}):
                out.append((method, path.replace("{model_id:path}", MODEL)))
    return out


def test_every_v1_route_rejects_missing_and_wrong_keys(keyed):
    routes = guarded_routes(keyed.app)
    assert ("POST", "/v1/completions") in routes and ("GET", "/v1/models") in routes
    routes.append(("GET", "/v1/not-a-route"))  # unknown paths are refused before routing
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for method, path in routes:
            for auth in [None, *WRONG]:
                headers = {} if auth is None else {"Authorization": auth}
                r = http.request(method, path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (method, path, auth, r.text[:200])
                error = r.json()["error"]
                assert error.keys() == {"message", "type", "param", "code"}
                assert error["code"] == "invalid_api_key" and KEY not in r.text
            ok = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "x"}],
                                    "tokens": [1]})
            assert ok.status_code != 401, (method, path)
        for public in ("/health", "/metrics", "/version"):
            assert http.get(public).status_code == 200


def test_key_is_compared_in_constant_time():
    source = inspect.getsource(server.api._Guard)
    assert "compare_digest" in source and "== self.expected" not in source


def test_default_bind_is_loopback_and_cors_off():
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.cors_origins == [] and args.api_key is None
    assert ServerSettings().cors_origins == () and ServerSettings().api_key is None


def test_no_cors_headers_unless_configured(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        preflight = http.options("/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        simple = http.get("/health", headers={"Origin": "http://evil.example"})
    for r in (preflight, simple):
        assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers


def test_no_request_field_names_a_file(keyed):
    """No request schema has a field that could carry a path, a URL to load or a pickle."""
    schema = httpx.get(keyed.url + "/openapi.json").json()
    names = set()
    for component in schema["components"]["schemas"].values():
        names |= set(component.get("properties", {}))
    suspicious = {n for n in names if any(w in n.lower() for w in
                                          ("path", "file", "checkpoint", "pickle", "url",
                                           "adapter", "lora", "dir"))}
    assert suspicious <= {"image_url"}, suspicious  # image_url is parsed only to refuse it
    source = inspect.getsource(server.api)
    assert "pickle" not in source and "torch.load" not in source


def test_api_key_never_in_the_logs(checkpoint_dir):
    proc, url = spawn_server(checkpoint_dir, "--api_key", KEY, "--log_level", "debug",
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(proc, url)
        with httpx.Client(base_url=url, timeout=30) as http:
            for auth in (f"Bearer {KEY}", f"Bearer {KEY}x", KEY):
                http.post("/v1/completions", headers={"Authorization": auth},
                          json={"prompt": "Alice", "max_tokens": 2, "unknown_field": 1})
                http.post("/v1/completions", headers={"Authorization": auth}, content=b"{bad")
        proc.terminate()
        logs, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert "POST /v1/completions" in logs or "serving" in logs  # the logs were captured
    assert KEY not in logs
