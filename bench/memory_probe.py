"""Where a serving process's memory goes (the figures in docs/RELIABILITY.md "Memory").

    nice -n 10 python bench/memory_probe.py heap --warmup 1500 --requests 4500
    nice -n 10 python bench/memory_probe.py onednn --rows 600

`heap`: the API server in this process (tiny random model, as the tests build it) gets
`--warmup` then `--requests` streaming completions, 64 at a time, 20 % abandoned after a
random number of events, seeded sampling; tracemalloc and the gc's object counts are compared
between the two points. Growth there is a Python-level leak; growth of RSS only is native.

`onednn`: bf16 linears of the demo model's shapes for every row count 1..--rows, twice over.
The first pass pays one oneDNN primitive per (rows, shape) (compiled, cached in an LRU of
ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 by default); the second pass reuses them. Prints RSS
after each pass and the median time of each call and of the same call repeated at once
(a cache hit either way in the second pass). RSS moves by hundreds of MiB between runs (the
allocator), so compare runs side by side. Run it again with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 to see the cache's share.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def rss_mib() -> int:
    return psutil.Process().memory_info().rss // MIB


async def load(url: str, model: str, n: int, seed: int) -> None:
    import httpx

    rng, slots = random.Random(seed), asyncio.Semaphore(64)
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        async def one() -> None:
            async with slots:
                body = {"model": model, "prompt": "Alice was " * rng.randint(1, 20),
                        "max_tokens": 32, "ignore_eos": True, "temperature": 0.8,
                        "seed": rng.randrange(2**31), "stream": True}
                leave_after = rng.randint(1, 20) if rng.random() < 0.2 else None
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    events = 0
                    async for _ in response.aiter_lines():
                        events += 1
                        if leave_after is not None and events >= leave_after:
                            break
        await asyncio.gather(*(one() for _ in range(n)))


def object_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def heap(args) -> None:
    # the tests' in-process server (uvicorn in a thread around a tiny random model)
    from fanformer.tokenizer import Tokenizer
    from server.api import ServerSettings
    from tests.conftest import FIXTURES
    from tests.test_api import MODEL, Running, make_engine

    tokenizer = Tokenizer.train_from_files([FIXTURES / "tiny.txt"], 512, show_progress=False)
    server = Running(make_engine(tokenizer, max_num_seqs=64),
                     ServerSettings(served_model_name=MODEL))
    try:
        tracemalloc.start(12)
        asyncio.run(load(server.url, MODEL, args.warmup, seed=0))
        counts, snapshot, rss = object_counts(), tracemalloc.take_snapshot(), rss_mib()
        started = time.monotonic()
        asyncio.run(load(server.url, MODEL, args.requests, seed=1))
        counts2, snapshot2, rss2 = object_counts(), tracemalloc.take_snapshot(), rss_mib()
    finally:
        server.stop()
    stats = snapshot2.compare_to(snapshot, "filename")
    grown = {k: counts2[k] - counts[k] for k in counts2 if counts2[k] - counts[k] > 0}
    print(f"{args.requests} requests after {args.warmup} of warm-up, "
          f"{time.monotonic() - started:.0f} s")
    print(f"RSS {rss} -> {rss2} MiB; traced Python heap "
          f"{sum(s.size_diff for s in stats) / MIB:+.2f} MiB")
    print("object types that grew most:", sorted(grown.items(), key=lambda kv: -kv[1])[:8])


def onednn(args) -> None:
    torch.set_num_threads(1)
    # (in, out) of the demo model's linears: attention/FFN, CoLA factors, the LM head
    shapes = [(256, 768), (768, 256), (256, 64), (64, 256), (256, 8192)]
    weights = [torch.randn(o, i, dtype=torch.bfloat16) for i, o in shapes]
    print(f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY')}"
          f" (unset: 1024); RSS at start {rss_mib()} MiB")
    for name in ("first pass (new shapes)", "second pass (same shapes)"):
        first, again = [], []  # each linear's own call, then the same call right after
        for rows in range(1, args.rows + 1):
            for w in weights:
                x = torch.randn(rows, w.shape[1], dtype=torch.bfloat16)
                for times in (first, again):
                    t0 = time.perf_counter()
                    F.linear(x, w)
                    times.append(time.perf_counter() - t0)
        print(f"{name}: {len(first)} linears, median call {statistics.median(first) * 1e3:.3f}"
              f" ms, repeated at once {statistics.median(again) * 1e3:.3f} ms, "
              f"RSS {rss_mib()} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("heap")
    h.add_argument("--warmup", type=int, default=1500)
    h.add_argument("--requests", type=int, default=4500)
    o = sub.add_parser("onednn")
    o.add_argument("--rows", type=int, default=600)
    args = parser.parse_args(argv)
    {"heap": heap, "onednn": onednn}[args.command](args)


if __name__ == "__main__":
    main()
