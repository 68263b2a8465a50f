"""How fanformer-serve should use its CPU threads: measured through HTTP.

The engine's step runs its ops on torch's OpenMP threads while the event loop (and, on a
shared machine, the load generator) needs the same cores between steps. libgomp's default
lets idle threads spin up to 300,000 times before they sleep; PASSIVE sleeps at once. And
steps of at most `SINGLE_THREAD_MAX_TOKENS` tokens run on one thread. This starts the
server once per variant (alternating which goes first by round) on the random
transformer-64m checkpoint of bench/side_by_side.py (bf16, or its 4-bit one with --variant
4bit) and drives it with the same load
generator at 1 / 16 / 64 streams, greedy and sampled. Medians over rounds.

    .venv/bin/python bench/omp_wait.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import side_by_side as sbs
from alternating import Variant, measure, median_table

VARIANTS = {  # variant -> (environment set for the server on top of one without any
    #              OMP_WAIT_POLICY / GOMP_SPINCOUNT, SINGLE_THREAD_MAX_TOKENS or None)
    "libgomp default": ({}, None),
    "PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "spin 10k": ({"GOMP_SPINCOUNT": "10000"}, None),
    "spin 2k": ({"GOMP_SPINCOUNT": "2000"}, None),
    # libgomp takes an explicit GOMP_SPINCOUNT over PASSIVE's 0; LLVM's libomp reads only PASSIVE
    "PASSIVE, spin 2k": ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "2000"}, None),
    "PASSIVE, 2 threads always": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "PASSIVE, 1 thread up to 16": ({"OMP_WAIT_POLICY": "PASSIVE"}, 16),
}


def server_argv(checkpoint: Path, single_thread_max: int | None) -> list[str]:
    argv = sbs.ours_argv(checkpoint)
    if single_thread_max is None:
        return argv
    code = ("import sys, server.engine as e; e.SINGLE_THREAD_MAX_TOKENS = "
            f"{single_thread_max}; import server.cli; sys.exit(server.cli.main())")
    return [argv[0], "-c", code, *argv[3:]]  # argv = [python, -m, server.cli, flags...]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--modes", nargs="+", default=list(sbs.MODES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS)[:3], choices=list(VARIANTS))
    p.add_argument("--variant", choices=list(sbs.VARIANTS), default="bf16",
                   help="which of side_by_side's checkpoints the server loads")
    p.add_argument("--out", type=Path, default=None, help="JSON of every point")
    args = sbs.parse_args([])  # side_by_side's defaults: anchors folder, cache, prompt shape
    own = p.parse_args()
    if own.out and own.out.exists():  # before the long run, and never over a file
        p.error(f"--out {own.out} exists; pass another --out")
    checkpoint = sbs.build_checkpoints(sbs.ANCHOR_PRESET, args.cache)[own.variant]
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    variants = {name: Variant(server_argv(checkpoint, VARIANTS[name][1]),
                              {**base, **VARIANTS[name][0]}) for name in own.variants}
    points = measure(variants, own.rounds, own.modes, own.streams, args)
    if own.out:
        with open(own.out, "x") as f:  # "x": not even a file created during the run
            f.write(json.dumps(points, indent=1))
    print("\n" + median_table(points, own.variants))


if __name__ == "__main__":
    main()
