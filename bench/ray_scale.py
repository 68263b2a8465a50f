"""fanformer-serve on Ray Serve, the runs too heavy for CI: 1 vs 2 replicas, a replica killed
under a 32-client streaming load, autoscaling from 1 replica on a load step.

    python bench/ray_scale.py [--only throughput,fault,autoscale] [--checkpoint DIR]

Starts a local Ray cluster (loopback, 2 CPUs, with Ray's dashboard: its state API reports
each replica's PID), serves the demo model (or --checkpoint) through server/ray_app.py
exactly as `fanformer-serve --ray` would, and prints one JSON line per run. The fault run
kills a replica by the PID Ray reports for it, never by a process name. Every wait is
bounded; docs/SERVING.md records the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

import httpx
import openai
import psutil
import ray
from ray import serve
from ray.util.state import list_actors

from server import ray_app
from server.cli import build_parser, check_args

MODEL = "fanformer-demo"
REPLICA_CLASS = f"ServeReplica:{ray_app.APP_NAME}:{ray_app.DEPLOYMENT}"  # Ray's actor class


def deploy(checkpoint: str | None, *flags: str) -> None:
    argv = ([checkpoint] if checkpoint else []) + ["--served_model_name", MODEL, *flags]
    args = build_parser().parse_args(argv)
    check_args(args)
    ray_app.check_ray_args(args)
    serve.run(ray_app.application(args), name=ray_app.APP_NAME, route_prefix="/")


def running() -> int:
    app = serve.status().applications.get(ray_app.APP_NAME)
    return 0 if app is None else \
        app.deployments[ray_app.DEPLOYMENT].replica_states.get("RUNNING", 0)


def replica_pids() -> list[int]:
    """The PIDs of this app's live replicas on this node, as Ray's state API reports them."""
    here = ray.get_runtime_context().get_node_id()
    actors = list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return [a.pid for a in actors if a.node_id == here]


def kill_replica(pid: int) -> None:
    """SIGKILL one replica's worker, checking first that Ray still reports that PID for a
    replica of this app (a PID is never taken from a process name)."""
    if pid not in replica_pids():
        raise RuntimeError(f"Ray no longer reports a replica with PID {pid}")
    psutil.Process(pid).kill()


async def stream_one(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[str, int]:
    """(outcome, tokens): 'ok' (finished by length), 'cut' (ended without a finish reason) or
    the exception's class name."""
    tokens, finish = 0, None
    try:
        async for chunk in await client.completions.create(
                model=MODEL, prompt=f"Alice number {i} said", max_tokens=max_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True}):
            tokens += 1
            finish = chunk.choices[0].finish_reason or finish
    except Exception as e:  # noqa: BLE001 - what a client sees is the measurement
        return type(e).__name__, tokens
    return ("ok" if finish == "length" else "cut"), tokens


def client(url: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=retries,
                              timeout=120)


async def throughput(url: str, clients: int = 32, rounds: int = 2, max_tokens: int = 64) -> dict:
    async with client(url) as c:
        await stream_one(c, 0, 4)  # warm-up
        start = time.perf_counter()
        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*(stream_one(c, i, max_tokens)
                                              for i in range(clients)))
        wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"requests": len(results), "ok": sum(o == "ok" for o, _ in results),
            "tokens": tokens, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


async def fault(url: str, clients: int = 32, max_tokens: int = 128) -> dict:
    """Kill one replica's worker process 1.5 s into a 32-client streaming load."""
    before = replica_pids()
    async with client(url) as c:
        load = [asyncio.ensure_future(stream_one(c, i, max_tokens)) for i in range(clients)]
        await asyncio.sleep(1.5)
        victim = before[0]
        kill_replica(victim)
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*load), timeout=180)
        load_done_s = time.monotonic() - killed_at
        failed = [i for i, (o, _) in enumerate(results) if o != "ok"]
        async with client(url, retries=3) as retrying:  # what a retrying client gets
            retried = await asyncio.gather(*(stream_one(retrying, i, max_tokens)
                                             for i in failed))
    back = None
    while time.monotonic() - killed_at < 120:
        if running() == 2 and victim not in replica_pids() and len(replica_pids()) == 2:
            back = time.monotonic() - killed_at
            break
        await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=10) as http:
        health = (await http.get(url + "/health")).status_code
    outcomes: dict[str, int] = {}
    for o, _ in results:
        outcomes[o] = outcomes.get(o, 0) + 1
    return {"clients": clients, "outcomes": outcomes, "all_ended_s": round(load_done_s, 1),
            "retried_ok": sum(o == "ok" for o, _ in retried), "retried": len(failed),
            "replica_back_s": None if back is None else round(back, 1), "health": health}


async def autoscale(url: str, load_s: float = 45, idle_s: float = 45) -> dict:
    """Replica count over time: idle, then 32 streaming clients for load_s, then idle."""
    timeline, t0, stop = [], time.monotonic(), asyncio.Event()

    async def watch():
        last = None
        while not stop.is_set():
            n = running()
            if n != last:
                timeline.append((round(time.monotonic() - t0, 1), n))
                last = n
            await asyncio.sleep(0.5)

    outcomes: dict[str, int] = {}

    async def keep_streaming(c, i):
        while time.monotonic() - t0 < 3 + load_s:
            outcome, _ = await stream_one(c, i, 64)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(3)
    async with client(url) as c:
        await asyncio.gather(*(keep_streaming(c, i) for i in range(32)))
    load_end = round(time.monotonic() - t0, 1)
    while time.monotonic() - t0 < load_end + idle_s and running() != 1:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)
    stop.set()
    await watcher
    return {"load_from_s": 3, "load_until_s": load_end, "requests": outcomes,
            "replicas_timeline": timeline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="throughput,fault,autoscale")
    p.add_argument("--checkpoint", default=None)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        runs = a.only.split(",")
        if "throughput" in runs:
            for n in (1, 2):
                deploy(a.checkpoint, "--num_replicas", str(n), "--replica_cpus", "1")
                print(json.dumps({"run": "throughput", "replicas": n,
                                  **asyncio.run(throughput(url))}), flush=True)
        if "fault" in runs:
            deploy(a.checkpoint, "--num_replicas", "2", "--replica_cpus", "1")
            print(json.dumps({"run": "fault", **asyncio.run(fault(url))}), flush=True)
        if "autoscale" in runs:
            serve.delete(ray_app.APP_NAME)
            deploy(a.checkpoint, "--min_replicas", "1", "--max_replicas", "2",
                   "--target_ongoing_requests", "4", "--upscale_delay_s", "2",
                   "--downscale_delay_s", "10", "--replica_cpus", "1")
            print(json.dumps({"run": "autoscale", **asyncio.run(autoscale(url))}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
