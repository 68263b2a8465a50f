"""SIGTERM drains: running requests finish, new ones get 503, then the server stops.

In-process servers run fanformer-serve's DrainingServer in a thread and receive the signal as
a direct `handle_exit(SIGTERM, None)` call (signals reach only the main thread); the last test
sends a real SIGTERM to a real `fanformer-serve`. A request is held in flight
deterministically by sending only half of its body: the server has admitted it (the drain
gate counted it) but cannot answer until the rest arrives.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import time

import httpx
import pytest

import server.drain
from server.api import ServerSettings
from tests.test_api import MODEL, Running, make_engine, spawn_server, wait_healthy, wait_until

STREAM = {"model": MODEL, "prompt": "Alice", "ignore_eos": True, "temperature": 0,
          "stream": True, "stream_options": {"include_usage": True}}


class HalfSent:
    """A POST /v1/completions with half of its body sent; `finish()` sends the rest and
    returns (status, JSON body)."""

    def __init__(self, url: str, request: dict):
        host, port = url.removeprefix("http://").split(":")
        self.body = json.dumps(request).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: " +
                          str(len(self.body)).encode() + b"\r\n\r\n" +
                          self.body[:len(self.body) // 2])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[len(self.body) // 2:])
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        self.sock.close()


def assert_refused_while_draining(url: str) -> None:
    refused = httpx.post(url + "/v1/completions", timeout=30,
                         json={"model": MODEL, "prompt": "Alice", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    assert httpx.get(url + "/health", timeout=30).status_code == 503  # readiness: stop routing
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200


def test_drain_finishes_running_requests_and_refuses_new_ones(tokenizer):
    running = Running(make_engine(tokenizer), ServerSettings(served_model_name=MODEL),
                      draining=True)
    drain = running.app.state.drain
    held = HalfSent(running.url, {"model": MODEL, "prompt": "Alice", "max_tokens": 5,
                                  "temperature": 0})
    try:
        wait_until(lambda: drain.in_flight == 1)
        with httpx.stream("POST", running.url + "/v1/completions", timeout=60,
                          json={**STREAM, "max_tokens": 400}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            running.server.handle_exit(signal.SIGTERM, None)
            assert drain.draining and not running.server.should_exit
            assert_refused_while_draining(running.url)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 400
        assert not running.server.should_exit  # the half-sent request still holds the drain
        status, body = held.finish()  # admitted before the signal: served, not refused
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        running.thread.join(30)
        assert not running.thread.is_alive() and not running.engine.is_running
    finally:
        held.close()
        running.stop()


def test_drain_deadline_aborts_what_still_runs(tokenizer, monkeypatch):
    monkeypatch.setattr(server.drain, "AFTER_ABORT_S", 0.5)
    running = Running(make_engine(tokenizer),
                      ServerSettings(served_model_name=MODEL, shutdown_timeout=0.3),
                      draining=True, timeout_graceful_shutdown=1)
    step = running.engine.engine.step

    def slow_step():  # 400 tokens would take 8 s; the deadline is 0.3 s
        time.sleep(0.02)
        return step()
    running.engine.engine.step = slow_step
    held = HalfSent(running.url, {"model": MODEL, "prompt": "Alice", "max_tokens": 5})
    try:
        with httpx.stream("POST", running.url + "/v1/completions", timeout=60,
                          json={**STREAM, "max_tokens": 400}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            started = time.monotonic()
            running.server.handle_exit(signal.SIGTERM, None)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"  # a clean end: an error event, then [DONE]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "aborted" and "shut down" in error["message"]
        assert len(events) < 400
        # the half-sent request never completes: the server stops anyway
        running.thread.join(30)
        assert not running.thread.is_alive()
        assert time.monotonic() - started < 10
    finally:
        held.close()
        running.stop()


def test_second_signal_skips_the_drain(tokenizer):
    running = Running(make_engine(tokenizer), ServerSettings(served_model_name=MODEL),
                      draining=True, timeout_graceful_shutdown=1)
    held = HalfSent(running.url, {"model": MODEL, "prompt": "Alice", "max_tokens": 5})
    try:
        wait_until(lambda: running.app.state.drain.in_flight == 1)
        running.server.handle_exit(signal.SIGTERM, None)
        assert not running.server.should_exit
        running.server.handle_exit(signal.SIGTERM, None)
        assert running.server.should_exit
        running.thread.join(30)
        assert not running.thread.is_alive()
    finally:
        held.close()
        running.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_drains_on_signal(checkpoint_dir, signum):
    proc, url = spawn_server(checkpoint_dir, "--log_level", "warning", stderr=subprocess.PIPE)
    held = None
    try:
        wait_healthy(proc, url)
        held = HalfSent(url, {"model": checkpoint_dir.name, "prompt": "Alice", "max_tokens": 3})
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                **STREAM, "model": checkpoint_dir.name, "max_tokens": 120}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signum)
            wait_until(lambda: httpx.get(url + "/health").status_code == 503, timeout=30)
            refused = httpx.post(url + "/v1/completions", json={"prompt": "Alice"}, timeout=30)
            assert refused.status_code == 503, refused.text
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"  # the running stream still finishes
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 120
        assert proc.poll() is None  # still draining: the half-sent request is in flight
        status, body = held.finish()
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert proc.wait(60) == 0
    finally:
        if held is not None:
            held.close()
        if proc.poll() is None:
            proc.kill()
