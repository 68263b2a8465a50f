"""Garbage-collector pauses in fanformer-serve under load: its start-up heap frozen (what it
does since server/launch.py `freeze_startup_heap`) against not frozen (what it did before).

    .venv/bin/python bench/gc_pauses.py --rounds 2 --streams 64 --mode sampled

Each point starts the server on side_by_side's random transformer-64m checkpoint (or
--checkpoint), runs the load generator once (64-token prompts, 64 new tokens, streaming) and
stops it. A sitecustomize hook on the server's PYTHONPATH times every collection made after
start-up (from the call of `freeze_startup_heap`, which the "not frozen" arm turns into a
no-op) and writes them to a JSON file at exit. Arms alternate within a round; compare
figures of one run only, and run it on an idle machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from side_by_side import (
    MODES,
    ROOT,
    build_checkpoints,
    ours_argv,
    requests_for,
    run_load,
    start_servers,
)

HOOK = '''
import atexit, gc, json, os, time
import server.launch as launch
_stats, _start = {"0": [], "1": [], "2": []}, [0.0]
def _timed(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
    elif _stats is not None:
        _stats[str(info["generation"])].append(time.perf_counter() - _start[0])
_freeze = launch.freeze_startup_heap
def freeze_startup_heap():
    n = _freeze() if os.environ["GC_PAUSES_ARM"] == "frozen" else 0
    for v in _stats.values():
        v.clear()
    gc.callbacks.append(_timed)
    return n
launch.freeze_startup_heap = freeze_startup_heap
atexit.register(lambda: open(os.environ["GC_PAUSES_OUT"], "w").write(json.dumps(_stats)))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: side_by_side's random transformer-64m bf16 checkpoint")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--mode", choices=list(MODES), default="sampled")
    p.add_argument("--prompt-len", "--prompt_len", type=int, default=64, dest="prompt_len")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=64, dest="max_tokens")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fanformer-bench")
    p.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors",
                   help="the anchors folder: its load.py drives the load (else clients/loadgen.py)")
    args = p.parse_args()
    args.requests = None  # requests_for: 3 x streams
    checkpoint = args.checkpoint or build_checkpoints("transformer-64m", args.cache)["bf16"]
    print(f"# {checkpoint}, {args.streams} streams, {args.mode}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print("| round | arm | full collections | their ms (each) | younger ones, ms in all "
          "| output tok/s | ITL p50 ms |\n|---:|---|---:|---|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "hook").mkdir()
        (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
        for rnd in range(args.rounds):
            arms = ["frozen", "not frozen"][:: 1 if rnd % 2 == 0 else -1]
            for arm in arms:
                out = tmp / f"gc-{rnd}-{arm.replace(' ', '_')}.json"
                path = os.pathsep.join(p for p in (str(tmp / "hook"), str(ROOT),
                                                   os.environ.get("PYTHONPATH")) if p)
                env = {**os.environ, "PYTHONPATH": path,  # the server's alone
                       "GC_PAUSES_ARM": arm, "GC_PAUSES_OUT": str(out)}
                with ExitStack() as stack:
                    (server,) = start_servers([("fanformer-serve", ours_argv(checkpoint))],
                                              tmp, stack, env)
                    figures = run_load(server.url, args.streams,
                                       requests_for(args.streams, args), args.mode,
                                       args.max_tokens, args, seed=rnd, tmp=tmp)
                gc = json.loads(out.read_text())
                full = ", ".join(f"{s * 1e3:.0f}" for s in gc["2"]) or "-"
                young = sum(gc["0"]) + sum(gc["1"])
                print(f"| {rnd} | {arm} | {len(gc['2'])} | {full} | {young * 1e3:.0f} "
                      f"| {figures['output_tok_s']:.1f} | {figures['itl_ms_p50']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
