#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server: N concurrent streaming clients.

    python clients/loadgen.py --url http://127.0.0.1:8000/v1 --concurrency 16 --num_requests 64

Each of `--concurrency` workers sends streaming `/completions` (or `/chat/completions`)
requests back to back until `--num_requests` have been sent. It reports time to first token
(the first chunk that carries text or a finish reason) and inter-token latency (the gaps
between such chunks)
percentiles, end-to-end latency, output tokens/s over the wall-clock time, requests/s and
errors. Output tokens come from the usage chunk (`stream_options.include_usage`); servers
that do not send one are counted one token per text chunk. Needs only httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    ok: bool
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def numbered_ids(ids: list[int], i: int) -> list[int]:
    """Request i's token ids: each of `ids` moved up by i within their own range (min..max),
    so requests differ from the first token on and a server's prefix cache cannot serve one
    request's prompt from another's (as numbered text prompts differ)."""
    low, span = min(ids), max(ids) - min(ids) + 1
    return [low + (t - low + i) % span for t in ids]


def request_body(args, i: int) -> dict:
    prompt = args.prompt if args.same_prompt else f"{args.prompt} ({i})"
    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": True,
            "temperature": args.temperature,
            "stream_options": {"include_usage": True}}
    if args.prompt_ids is not None:
        body["prompt"] = args.prompt_ids if args.same_prompt else numbered_ids(args.prompt_ids, i)
    elif args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.ignore_eos:  # a vLLM-style extra: fixed-length outputs
        body["ignore_eos"] = True
    return body


async def one_request(http: httpx.AsyncClient, args, i: int) -> Result:
    path = "/chat/completions" if args.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    result = Result(ok=False)
    last = None
    chunks = 0
    try:
        async with http.stream("POST", args.url + path, json=request_body(args, i)) as r:
            if r.status_code != 200:
                await r.aread()
                result.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choice = chunk["choices"][0] if chunk["choices"] else {}
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text or choice.get("finish_reason"):  # not the chat role-only chunk
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = True
    return result


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as http:
        if args.model is None:
            models = (await http.get(args.url + "/models")).json()
            args.model = models["data"][0]["id"]
        for i in range(args.warmup):
            await one_request(http, args, -1 - i)
        counter = iter(range(args.num_requests))
        results: list[Result] = []

        async def worker():
            for i in counter:
                results.append(await one_request(http, args, i))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "url": args.url, "model": args.model, "concurrency": args.concurrency,
        "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
        "wall_s": round(wall, 3), "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "requests_per_s": round(len(ok) / wall, 2) if wall else None,
        "ttft_ms": {f"p{q}": ms(percentile(ttft, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": ms(percentile(itl, q)) for q in (50, 90, 99)},
        "e2e_ms": {"p50": ms(percentile(e2e, 50)), "p99": ms(percentile(e2e, 99)),
                   "mean": ms(statistics.fmean(e2e)) if e2e else None},
    }


def print_report(report: dict) -> None:
    print(f"{report['url']}  model={report['model']}  concurrency={report['concurrency']}")
    print(f"  requests {report['requests']}  errors {report['errors']}  "
          f"wall {report['wall_s']} s  output {report['output_tokens']} tokens")
    print(f"  output tokens/s {report['output_tokens_per_s']}  "
          f"requests/s {report['requests_per_s']}")
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        print(f"  {name:8s} " + "  ".join(f"{k} {v}" for k, v in report[name].items()))
    for sample in report["error_samples"]:
        print(f"  error: {sample}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the API base URL")
    p.add_argument("--model", default=None, help="model id (default: the first of /models)")
    p.add_argument("--api_key", default=None, help="sent as a Bearer token")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--num_requests", type=int, default=None,
                   help="requests in total (default: 4 x concurrency)")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=None, help="sent when given")
    p.add_argument("--prompt", default="Alice was beginning to get very tired of sitting by "
                                       "her sister on the bank")
    p.add_argument("--prompt_ids", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="comma-separated token ids to send instead of --prompt (request i "
                        "sends them moved up by i within their range, unless --same_prompt)")
    p.add_argument("--same_prompt", action="store_true",
                   help="send the identical prompt every time (default: numbered prompts)")
    p.add_argument("--ignore_eos", action="store_true",
                   help="send ignore_eos (vLLM extra) so every output is max_tokens long")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="also write the report to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        print("loadgen: --concurrency must be at least 1", file=sys.stderr)
        return 1
    args.num_requests = args.num_requests or 4 * args.concurrency
    args.url = args.url.rstrip("/")
    try:
        report = asyncio.run(run(args))
    except httpx.HTTPError as e:
        print(f"loadgen: cannot reach {args.url} ({e})", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "args": {k: v for k, v in vars(args).items()
                                          if k != "api_key"}}, f, indent=2)
    return 1 if report["errors"] == report["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
