"""Soak test: N concurrent streaming clients against `fanformer-serve` for T seconds.

    nice -n 10 python bench/soak.py --clients 64 --duration 150 --disconnect_share 0.2

Starts the server (the demo model unless --checkpoint) as a subprocess on a free loopback
port, then runs `--clients` workers that send streaming /v1/completions back to back until
`--duration` seconds have passed (and at most `--max_requests` in all). A share of requests
(`--disconnect_share`) is abandoned after a random number of events. Reports: errors seen by
the clients that stayed (non-200, error events, a missing [DONE], exceptions), the server's
RSS at start (after a warm-up), middle and end, its KV cache usage and running count once
idle, and /metrics' finished-request counters next to what the clients saw. Writes JSON.
Loopback only; bounded in time and count. It knows the server only through HTTP and its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from bench_http import free_port  # bench/ is on sys.path when this runs as a script
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="default: the demo model")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    p.add_argument("--max_requests", type=int, default=100_000)
    p.add_argument("--disconnect_share", type=float, default=0.2)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="soak.json")
    return p.parse_args(argv)


def metrics(url: str) -> dict[str, float]:
    """/metrics as {name: value} or {name{finished_reason="..."}: value} (model_name dropped)."""
    out = {}
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            key = sample.name + (f'{{finished_reason="{reason}"}}' if reason else "")
            out[key] = sample.value
    return out


class Tally:
    def __init__(self):
        self.completed = self.disconnected = self.sent = self.tokens = 0
        self.errors: list[str] = []


async def one_request(http: httpx.AsyncClient, tally: Tally, rng: random.Random, i: int,
                      max_tokens: int, disconnect_share: float) -> None:
    leave_after = rng.randint(1, max_tokens) if rng.random() < disconnect_share else None
    body = {"prompt": f"Alice was beginning ({i})", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.8, "stream_options": {"include_usage": True}}
    tally.sent += 1
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                tally.errors.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                return
            events = 0
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if leave_after is not None and events >= leave_after:
                    tally.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    tally.errors.append(f"error event: {chunk['error']['message']}")
                    return
                last = chunk
            if data != "[DONE]" or not last or not last.get("usage"):
                tally.errors.append("stream ended without usage and [DONE]")
                return
            tally.completed += 1
            tally.tokens += last["usage"]["completion_tokens"]
    except (httpx.HTTPError, ValueError) as e:
        tally.errors.append(f"{type(e).__name__}: {e}")


async def drive(url: str, args, tally: Tally, rss: list[tuple[float, int]], proc) -> None:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.duration
    counter = iter(range(args.max_requests))
    limits = httpx.Limits(max_connections=args.clients * 2)

    async def worker():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            while time.monotonic() < deadline:
                i = next(counter, None)
                if i is None:
                    return
                await one_request(http, tally, rng, i, args.max_tokens, args.disconnect_share)

    async def sample_rss():
        start = time.monotonic()
        while time.monotonic() < deadline:
            rss.append((time.monotonic() - start, proc.memory_info().rss))
            await asyncio.sleep(1.0)
    await asyncio.gather(sample_rss(), *(worker() for _ in range(args.clients)))


def main(argv=None) -> int:
    args = parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
           "--max_num_seqs", str(args.clients), "--log_level", "warning"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    server = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print("soak: the server did not start", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        proc = psutil.Process(server.pid)
        before = metrics(url)
        tally, rss = Tally(), []
        t0 = time.monotonic()
        asyncio.run(drive(url, args, tally, rss, proc))
        wall = time.monotonic() - t0
        idle_deadline = time.monotonic() + 60
        while True:  # aborted requests leave the engine asynchronously
            after = metrics(url)
            if after["vllm:num_requests_running"] == 0 or time.monotonic() > idle_deadline:
                break
            time.sleep(0.2)
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)
    warm = [r for t, r in rss if t >= 0.1 * args.duration] or [r for _, r in rss]
    mib = 1024 * 1024
    finished = {reason: delta(f'vllm:request_success_total{{finished_reason="{reason}"}}')
                for reason in ("stop", "length", "abort", "error")}
    report = {
        "clients": args.clients, "duration_s": round(wall, 1), "sent": tally.sent,
        "completed": tally.completed, "disconnected_on_purpose": tally.disconnected,
        "errors": len(tally.errors), "first_errors": tally.errors[:5],
        "rss_mib": {"start_after_warmup": round(warm[0] / mib, 1),
                    "middle": round(warm[len(warm) // 2] / mib, 1),
                    "end": round(warm[-1] / mib, 1), "max": round(max(warm) / mib, 1),
                    "every_10s": [round(r / mib) for t, r in rss[::10]]},
        "idle_after": {"num_requests_running": after["vllm:num_requests_running"],
                       "num_requests_waiting": after["vllm:num_requests_waiting"],
                       "kv_cache_usage_perc": after["vllm:kv_cache_usage_perc"],
                       "health": health},
        "metrics_finished": finished,
        "metrics_generation_tokens": delta("vllm:generation_tokens_total"),
        "client_completion_tokens": tally.tokens,
        "metrics_match_clients": finished["stop"] + finished["length"] >= tally.completed
        and finished["stop"] + finished["length"] + finished["abort"] == tally.sent
        - len(tally.errors) and finished["error"] == 0,
    }
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = not tally.errors and report["metrics_match_clients"] and health == 200 \
        and after["vllm:kv_cache_usage_perc"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
