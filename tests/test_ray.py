"""The API suite through Ray Serve: two replicas of a tiny random checkpoint behind Ray's
proxy on a local Ray cluster (one per test module, loopback only), driven by the same tests
as the single-process server (imported from tests/test_api.py, so they run here against the
Ray endpoint), plus what only Ray does: a replica killed by its PID is replaced and /health
recovers, and fanformer-serve's SIGTERM drain (503 for new requests, streams cut at the
deadline end with an error event and [DONE]). Skipped when the `ray` extra is not installed.
Heavier runs (32-client fault run, autoscaling, 1 vs 2 replicas) are bench/ray_scale.py's;
docs/SERVING.md has their results.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import psutil
import pytest

from fanformer.checkpoint import save_checkpoint
from server.cli import build_parser, check_args
from tests import test_api
from tests.conftest import make_model
from tests.test_api import (  # noqa: F401 - collected here, run against the Ray endpoint
    KEY,
    MODEL,
    free_port,
    metric,
    test_chat_include_usage_matches_non_stream,
    test_completion_response_shape,
    test_error_statuses,
    test_invalid_requests_are_400_with_openai_body,
    test_logprobs_shapes,
    test_models_health_version_tokenize,
    test_prompt_shapes_and_choice_indices,
    test_raw_sse_framing_and_include_usage,
    test_seed_makes_sampling_reproducible,
    test_stream_equals_non_stream_chat,
    test_stream_equals_non_stream_completions,
    test_truncate_prompt_tokens_is_honoured,
    test_unknown_fields_are_ignored,
    wait_until,
)

serve = pytest.importorskip("ray.serve")
import ray  # noqa: E402 - only once the skip above has passed

from server import ray_app  # noqa: E402

pytestmark = pytest.mark.timeout(180)
REPLICA = f"ray::ServeReplica:{ray_app.APP_NAME}:{ray_app.DEPLOYMENT}"


class Endpoint:
    """What the imported tests use of tests/test_api.py's `Running`: the URL."""

    def __init__(self, url: str):
        self.url = url


def deploy(checkpoint, *flags: str, **settings) -> None:
    """serve.run the app from fanformer-serve's flags; returns once every replica is up."""
    args = build_parser().parse_args([str(checkpoint), "--served_model_name", MODEL,
                                      "--dtype", "float32", "--replica_cpus", "0.5", *flags])
    check_args(args)
    ray_app.check_ray_args(args)
    serve.run(ray_app.application(args, **settings), name=ray_app.APP_NAME, route_prefix="/")


def running_replicas() -> int:
    app = serve.status().applications[ray_app.APP_NAME]
    return app.deployments[ray_app.DEPLOYMENT].replica_states.get("RUNNING", 0)


def replica_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or ()).startswith(REPLICA)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("ray") / "ckpt",
                           make_model("test", max_seq_len=512), tokenizer)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def srv(cluster, checkpoint):
    deploy(checkpoint, "--num_replicas", "2", "--max_num_seqs", "32",
           max_request_bytes=64 * 1024)
    return Endpoint(cluster)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)


def test_two_replicas_serve_32_concurrent_streams_each_as_alone(srv):
    assert running_replicas() == 2 and len(replica_pids()) == 2
    prompts = [f"Alice number {i} said" for i in range(32)]
    params = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0)
    alone = [client.completions.create(prompt=p, **params).choices[0].text for p in prompts]
    streamed: dict[int, str] = {}

    def one(i: int) -> None:
        chunks = client.completions.create(prompt=prompts[i], stream=True, **params)
        streamed[i] = "".join(c.choices[0].text for c in chunks)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [streamed.get(i) for i in range(32)] == alone
    for name in ("vllm:num_requests_running", "vllm:generation_tokens_total"):
        metric(srv.url, name, model_name=MODEL)  # each replica's own /metrics, via the proxy


def test_a_killed_replica_is_replaced_and_health_recovers(srv):
    victim = replica_pids()[0]
    psutil.Process(victim).kill()
    wait_until(lambda: victim not in replica_pids(), timeout=10)
    # meanwhile the survivor answers: Ray routes around the dead replica
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=2)
    assert client.completions.create(model=MODEL, prompt="Alice", max_tokens=3).choices
    wait_until(lambda: running_replicas() == 2 and len(replica_pids()) == 2, timeout=90)
    assert httpx.get(srv.url + "/health").status_code == 200


# ---------------------------------------------------------------- auth, overload: 1 small replica
@pytest.fixture(scope="module")
def small(srv, checkpoint):
    """Redeploys the app (same name, so it replaces the two replicas) as one replica with one
    slot, one queue place and an API key: test_api.py's `small` server."""
    deploy(checkpoint, "--num_replicas", "1", "--max_num_seqs", "1", "--max_queue_len", "1",
           "--api_key", KEY, retry_after_s=2)
    wait_until(lambda: len(replica_pids()) == 1, timeout=60)
    return srv


# test_api.py's, against the one-replica deployment (waits on /metrics, not the engine)
test_full_queue_is_429_with_retry_after_through_ray = \
    test_api.test_full_queue_is_429_with_retry_after


def test_flags_ray_cannot_honour_are_one_line_errors():
    for flags, message in ((["--port", "0"], "fixed --port"),
                           (["--min_replicas", "3", "--max_replicas", "2"], "min_replicas"),
                           (["--replica_cpus", "0"], "replica_cpus")):
        args = build_parser().parse_args(["--ray", *flags])
        with pytest.raises(ray_app.CLIError, match=message):
            ray_app.check_ray_args(args)


test_api_key_through_ray = test_api.test_api_key  # last: it needs the `small` redeploy


# ---------------------------------------------------------------- last: fanformer-serve's drain
def test_sigterm_drain_refuses_new_requests_and_ends_cut_streams_cleanly(cluster, tokenizer,
                                                                          tmp_path):
    """What serve_on_ray does on SIGTERM, step by step: drain_replicas, then serve.delete.
    --shutdown_timeout 0 makes the deadline the drain's start, so a stream 8000 tokens long
    is cut by the abort: it must end with the `aborted` error event and [DONE] (Ray's own
    stop would kill the replica and leave it hanging without them)."""
    long_context = save_checkpoint(tmp_path / "ckpt", make_model("test", max_seq_len=8192),
                                   tokenizer)
    drain_signal = ray_app.DrainSignal.remote()
    deploy(long_context, "--num_replicas", "2", "--shutdown_timeout", "0",
           drain_signal=drain_signal)
    wait_until(lambda: ray.get(drain_signal.pending.remote()) == 2, timeout=30)
    left: list[int] = []
    with httpx.stream("POST", cluster + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Alice", "max_tokens": 8000, "ignore_eos": True,
            "temperature": 0, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        drainer = threading.Thread(target=lambda: left.append(
            ray_app.drain_replicas(drain_signal, 0)))
        drainer.start()
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) < 8000
    error = json.loads(events[-2])["error"]
    assert error["code"] == "aborted" and set(error) == {"message", "type", "param", "code"}
    # every replica drains: new requests get the single-process server's 503, from either
    refused = httpx.post(cluster + "/v1/completions", timeout=30,
                         json={"model": MODEL, "prompt": "Alice", "max_tokens": 2})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert httpx.get(cluster + "/health", timeout=30).status_code == 503
    assert httpx.get(cluster + "/metrics", timeout=30).status_code == 200
    drainer.join(30)
    assert left == [0]  # both replicas reported drained
    serve.delete(ray_app.APP_NAME)
    assert ray_app.APP_NAME not in serve.status().applications
