"""bench/side_by_side.py sends each point prompts no other point sent.

fanformer-serve's prefix cache (on by default) keeps a finished request's prompt blocks, so
a point replaying an earlier point's prompts on the same server would skip their prefill
while llama-server (`--no-cache-prompt`) recomputes them. No servers run here: the load
generator is replaced by a recorder.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import side_by_side  # noqa: E402

LOAD_PY_STRIDE = 1_000_003  # the anchors' load.py seeds request i with seed * this + i


class FakeServer:
    def __init__(self, name: str):
        self.name, self.url = name, f"http://{name}"

    def cpu_seconds(self) -> float:
        return 0.0


def test_every_point_gets_prompts_no_other_point_sent(monkeypatch, tmp_path):
    calls = []

    def record(url, streams, requests, mode, max_tokens, args, seed, tmp):
        calls.append((url, mode, streams, requests, seed))
        return {"output_tok_s": 1.0, "ttft_ms_p50": 1.0, "failed": 0, "short_outputs": 0}

    monkeypatch.setattr(side_by_side, "run_load", record)
    args = Namespace(streams=[1, 16, 64], modes=list(side_by_side.MODES), max_tokens=64,
                     requests=None)
    servers = [FakeServer(side_by_side.OURS), FakeServer("llama-server")]
    for rnd in range(3):  # the bench starts new servers each round; one pair here: stricter
        side_by_side.measure_group(servers, "bf16", "m", rnd, args, tmp_path, [])
    warmup = {side_by_side.WARMUP_SEED * LOAD_PY_STRIDE + i for i in range(64)}
    for server in servers:
        points = [c for c in calls if c[0] == server.url and c[4] != side_by_side.WARMUP_SEED]
        assert len(points) == 3 * 2 * 3  # rounds x modes x stream counts
        prompts = [{seed * LOAD_PY_STRIDE + i for i in range(requests)}
                   for _, _, _, requests, seed in points]
        assert sum(map(len, prompts)) == len(set().union(*prompts)), \
            f"{server.name}: two points share prompts: {[c[1:] for c in points]}"
        assert not warmup & set().union(*prompts)
    # the two servers of a point are sent the same prompts
    by_point = {}
    for url, *_, seed in calls:
        if seed != side_by_side.WARMUP_SEED:
            by_point.setdefault(seed, set()).add(url)
    assert len(by_point) == 18 and all(len(urls) == 2 for urls in by_point.values())
