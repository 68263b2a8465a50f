"""fanformer-serve from two (or more) source trees through HTTP, in alternating rounds:
whether a change pays where users feel it, with bench/side_by_side.py's random
transformer-64m checkpoints, load generator and prompt shape, and the server's defaults.

    git worktree add /tmp/base <commit>          # the tree to compare against
    .venv/bin/python bench/ab_http.py --trees /tmp/base . --variant 4bit --streams 16 64

Each tree's server runs `python -m server.cli` from that tree (its own fanformer, quant
and server packages; the venv's dependencies). Prints the median output tok/s per point
and tree; figures of one run only compare with each other.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import side_by_side as sbs
from alternating import Variant, measure, median_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", type=Path, nargs="+", required=True,
                   help="source checkouts (e.g. git worktrees of two commits)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--modes", nargs="+", default=list(sbs.MODES), choices=list(sbs.MODES))
    p.add_argument("--variant", choices=list(sbs.VARIANTS), default="bf16",
                   help="which of side_by_side's checkpoints the servers load")
    p.add_argument("--out", type=Path, default=None, help="JSON of every point")
    own = p.parse_args()
    trees = [t.resolve() for t in own.trees]
    for t in trees:
        if not (t / "server" / "cli.py").is_file():
            p.error(f"{t} is not a fanformer source tree (no server/cli.py)")
    if len(set(trees)) != len(trees):
        p.error("--trees names the same tree twice")
    if own.out and own.out.exists():  # before the long run, and never over a file
        p.error(f"--out {own.out} exists; pass another --out")
    args = sbs.parse_args([])  # side_by_side's defaults: anchors folder, cache, prompt shape
    checkpoint = sbs.build_checkpoints(sbs.ANCHOR_PRESET, args.cache)[own.variant]
    variants = {str(t): Variant(sbs.ours_argv(checkpoint),
                                {**os.environ, "PYTHONPATH": str(t)}, t) for t in trees}
    print(f"# {own.variant} transformer-64m, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    points = measure(variants, own.rounds, own.modes, own.streams, args)
    if own.out:
        with open(own.out, "x") as f:  # "x": not even a file created during the run
            f.write(json.dumps(points, indent=1))
    print("\n" + median_table(points, list(variants)))


if __name__ == "__main__":
    main()
