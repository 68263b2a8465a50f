"""bench/side_by_side_report.py on hand-written points: same-round ratios, medians, targets.

No servers and no torch: the report only reads the result dict the bench builds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from side_by_side_report import PAIR_TARGETS, report_markdown, summarize  # noqa: E402


def point(rnd, server, tok_s, variant="bf16", mode="greedy", streams=16,
          model="transformer-64m", failed=0):
    return {"round": rnd, "model": model, "variant": variant, "mode": mode, "streams": streams,
            "server": server, "output_tok_s": tok_s, "ttft_ms_p50": 10.0, "tpot_ms_p50": 2.0,
            "loadavg_before": [0.5 + rnd, 0.4, 0.3], "failed": failed, "short_outputs": 0,
            "idle_server_cpu_s": 0.01}


def result(points, ceilings=()):
    return {"points": points, "ceilings": list(ceilings), "command": "python side_by_side.py",
            "started_utc": "2026-11-30T10:00:00+00:00", "finished_utc": "2026-11-30T10:20:00",
            "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "torch_threads": 2, "env": {}},
            "llama_server": None, "llama_skipped": "test",
            "protocol": {"load_generator": "load.py", "prompt_len": 64, "max_tokens": 64,
                         "requests": {16: 48}, "rounds": 2}}


def test_ratio_is_the_median_of_same_round_ratios_not_the_ratio_of_medians():
    # round 0: 200 / 100 = 2.0; round 1: 100 / 200 = 0.5 -> median of ratios 1.25, while
    # the ratio of the medians (150 / 150) would be 1.0
    r = result([point(0, "fanformer-serve", 200), point(0, "llama-server", 100),
                point(1, "fanformer-serve", 100), point(1, "llama-server", 200)])
    s = summarize(r)
    (row,) = s["ratios"]
    assert row["vs_llama"] == (2.0 + 0.5) / 2
    medians = {p["server"]: p["output_tok_s"] for p in s["points"]}
    assert medians["fanformer-serve"] == medians["llama-server"] == 150
    (target,) = s["targets"]
    assert target["least"] == PAIR_TARGETS["bf16", 16]
    assert target["value"] == 1.25 and target["met"] is True  # 1.25 >= the 1.0 target
    assert s["loadavg_1min"] == [0.5, 1.5]


def test_unmeasured_targets_are_absent_and_missed_ones_are_listed():
    r = result([point(0, "fanformer-serve", 90, variant="4bit", streams=2),
                point(0, "llama-server", 100, variant="4bit", streams=2),  # no target at 2
                point(0, "fanformer-serve", 90, variant="4bit", streams=64),
                point(0, "llama-server", 100, variant="4bit", streams=64, failed=1)])
    r["summary"] = summarize(r)
    (target,) = r["summary"]["targets"]
    assert not target["met"] and target["value"] == 0.9
    md = report_markdown(r)
    assert "missed: " + target["target"] in md
    assert "failed 1" in md  # the suspect point is named


def test_ceiling_and_sampled_over_greedy():
    ceilings = [{"round": 0, "model": "transformer-64m", "tok_s": 100.0, "threads": 1}]
    pts = [point(0, "fanformer-serve", 85, streams=1),
           point(0, "fanformer-serve", 70, mode="sampled", streams=1),
           point(0, "fanformer-serve", 100, model="fanformer-92m", streams=64),
           point(0, "fanformer-serve", 95, model="fanformer-92m", mode="sampled", streams=64)]
    s = summarize(result(pts, ceilings))
    assert s["ceilings"]["transformer-64m"]["greedy"] == 0.85
    verdicts = {t["target"]: t["met"] for t in s["targets"]}
    assert verdicts == {"transformer-64m bf16, greedy, 1 stream: ours / linear-only ceiling": True,
                        "transformer-64m bf16, sampled, 1 stream: ours / linear-only ceiling":
                            False,
                        "fanformer-92m bf16, 64 streams: sampled / greedy": True}


def test_each_stream_is_judged_by_the_ceilings_measured_around_it():
    # the greedy point is judged by (80 + 120) / 2 = 100, the sampled one by 50, not by the
    # median of all four ceilings (90)
    ceilings = [{"round": 0, "model": "transformer-64m", "mode": mode, "at": at,
                 "tok_s": tok_s, "threads": 2}
                for mode, at, tok_s in [("greedy", "before", 80.0), ("greedy", "after", 120.0),
                                        ("sampled", "before", 40.0), ("sampled", "after", 60.0)]]
    pts = [point(0, "fanformer-serve", 85, streams=1),
           point(0, "fanformer-serve", 45, mode="sampled", streams=1)]
    c = summarize(result(pts, ceilings))["ceilings"]["transformer-64m"]
    assert c["greedy"] == 0.85 and c["sampled"] == 0.9
    assert c["tok_s"] == 70.0  # the median of the four, for the report's line
