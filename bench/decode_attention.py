"""One layer's decode attention: gather path vs cascade (shared prefix once + own blocks) vs
the native kernel (each row read in place through its block table, quant/native_cpu.c).

The chat workload of issue 12: D decode rows share a system prompt (the same leading block
ids, as prefix caching gives them) and each has its own tokens after it. Times
`StepAttention.attend` for layer 0 (the step's K/V write included) at the transformer-64m
shape (8 heads, 4 KV heads, head_dim 64), bf16 by default, with the rows' own blocks
shuffled across the pool and the prefix's blocks either a contiguous run (read as a view)
or scattered (gathered once). Prints a Markdown table of ms per layer (median of --reps,
x n_layers for a step) and the load average; on a shared machine the numbers are
indicative only.

    .venv/bin/python bench/decode_attention.py --rows 64 --shared 400 --own 80
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from fanformer.config import ModelConfig
from quant import native_cpu
from server.kv_cache import KVCachePool, Segment, StepAttention


def build(config: ModelConfig, rows: int, shared: int, own: int, block_size: int,
          contiguous: bool, dtype: torch.dtype, seed: int):
    """A pool holding the rows' blocks and one decode segment per row (its token at the end:
    shared + own +- 10 tokens)."""
    rng = random.Random(seed)
    n_prefix = shared // block_size
    lengths = [shared + own + rng.randint(-10, 10) for _ in range(rows)]
    own_blocks = sum(-(-n // block_size) - n_prefix for n in lengths)
    num_blocks = n_prefix + own_blocks + 1
    ids = list(range(1, num_blocks))  # block 0 stays free: the gather path pads with it
    if not contiguous:
        rng.shuffle(ids)
    prefix, rest = ids[:n_prefix], ids[n_prefix:]
    rng.shuffle(rest)
    segments = []
    for n in lengths:
        need = -(-n // block_size) - n_prefix
        segments.append(Segment(prefix + [rest.pop() for _ in range(need)], n - 1, 1))
    pool = KVCachePool(config, num_blocks, block_size, dtype, "cpu")
    pool.k.normal_()
    pool.v.normal_()
    return pool, segments


def time_attend(pool, segments, cascade: bool, config: ModelConfig, dtype, reps: int,
                native: bool = False):
    """-> (ms per attend call, median; ms to build the step's StepAttention, median).
    Without cascade, the per-row path: the native kernel (`native`, where it runs) or the
    gather."""
    real = native_cpu.library
    if not native:
        native_cpu.library = lambda: None
    try:
        return _time_attend(pool, segments, cascade, config, dtype, reps, native)
    finally:
        native_cpu.library = real


def _time_attend(pool, segments, cascade, config, dtype, reps, native):
    n = len(segments)
    q = torch.randn(1, config.n_heads, n, config.head_dim, dtype=dtype)
    k = torch.randn(1, config.n_kv_heads, n, config.head_dim, dtype=dtype)
    v = torch.randn_like(k)
    builds, calls = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        att = StepAttention(pool, segments, cascade=cascade)
        t1 = time.perf_counter()
        att.attend(0, None, q, k, v)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        calls.append(t2 - t1)
    assert (att.prefix is not None) == cascade, "cascade was asked for but not taken"
    assert (att.native is not None) == (native and not cascade), "native was not taken"
    return 1e3 * statistics.median(calls), 1e3 * statistics.median(builds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="transformer-64m")
    p.add_argument("--rows", type=int, nargs="+", default=[64])
    p.add_argument("--shared", type=int, default=400, help="shared prefix tokens")
    p.add_argument("--own", type=int, default=80, help="each row's own tokens (+- 10)")
    p.add_argument("--block_size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    print(f"{args.preset} ({config.n_heads} heads, {config.n_kv_heads} KV heads, head_dim "
          f"{config.head_dim}), {args.dtype}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    native = native_cpu.library() is not None
    print("\n| rows x (shared + own) | prefix blocks | gather ms | cascade ms | native ms "
          "| speed-up cascade / native | build ms gather / cascade / native |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in args.rows:
            for contiguous in (True, False):
                pool, segs = build(config, rows, args.shared, args.own, args.block_size,
                                   contiguous, dtype, seed=rows)
                time_attend(pool, segs, True, config, dtype, 3)  # warm-up
                gather, gb = time_attend(pool, segs, False, config, dtype, args.reps)
                cascade, cb = time_attend(pool, segs, True, config, dtype, args.reps)
                nat, nb = time_attend(pool, segs, False, config, dtype, args.reps, True) \
                    if native else (float("nan"), float("nan"))
                print(f"| {rows} x ({args.shared} + ~{args.own}) | "
                      f"{'contiguous' if contiguous else 'scattered'} | {gather:.2f} | "
                      f"{cascade:.2f} | {nat:.2f} | {gather / cascade:.2f}x / "
                      f"{gather / nat:.2f}x | {gb:.2f} / {cb:.2f} / {nb:.2f} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
