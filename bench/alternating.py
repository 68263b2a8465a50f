"""Variants of fanformer-serve measured through HTTP in alternating rounds: each round starts
every variant's server in turn (the order reversed every other round, so neither always
runs first), warms it up as bench/side_by_side.py does, drives it with that file's load
generator at each (mode, streams) point, and stops it. Medians over rounds, in one table.
Shared by bench/omp_wait.py (thread settings) and bench/ab_http.py (two source trees)."""

from __future__ import annotations

import os
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import side_by_side as sbs


@dataclass
class Variant:
    """How to start one variant's server: its command line, whole environment and the
    source tree it runs from."""

    argv: list[str]
    env: dict = field(default_factory=lambda: dict(os.environ))
    cwd: Path = sbs.ROOT


def measure(variants: dict[str, Variant], rounds: int, modes: list[str], streams: list[int],
            args) -> list[dict]:
    """Every point of every variant, `rounds` times: -> one dict per point (round, variant,
    mode, streams, load average before it, and the load generator's figures). `args`:
    side_by_side's parsed arguments (cache, prompt shape, requests per point)."""
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            names = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
            for name in names:
                v = variants[name]
                with ExitStack() as stack:
                    server, = sbs.start_servers([(name, v.argv)], args.cache / "logs", stack,
                                                env=v.env, cwd=v.cwd)
                    for mode in modes:  # unrecorded: the largest batch's kernels and buffers
                        sbs.run_load(server.url, max(streams), max(streams), mode,
                                     min(args.max_tokens, 16), args, sbs.WARMUP_SEED, Path(tmp))
                    for mode in modes:
                        for n in streams:
                            load = os.getloadavg()[0]
                            r = sbs.run_load(server.url, n, sbs.requests_for(n, args), mode,
                                             args.max_tokens, args, sbs.point_seed(rnd, mode, n),
                                             Path(tmp))
                            points.append({"round": rnd, "variant": name, "mode": mode,
                                           "streams": n, "loadavg_before": load, **r})
                            print(f"round {rnd} {name:16} {mode:7} {n:3} streams: "
                                  f"{r['output_tok_s']:7.1f} tok/s (load {load:.2f})",
                                  flush=True)
    return points


def median_table(points: list[dict], names: list[str]) -> str:
    """Median output tok/s per (mode, streams) and variant, as a markdown table."""
    keys = dict.fromkeys((p["mode"], p["streams"]) for p in points)
    lines = ["| mode | streams | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for mode, n in keys:
        cells = [statistics.median(p["output_tok_s"] for p in points if p["variant"] == v
                                   and p["mode"] == mode and p["streams"] == n) for v in names]
        lines.append(f"| {mode} | {n} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return "\n".join(lines)
