"""bench/chat_prefix.py's pure parts: the chat workload, the sizes it asks servers for, and
the report's maths on hand-written results. No servers run here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import chat_prefix as cp  # noqa: E402
from chat_prefix_report import (  # noqa: E402
    LLAMA,
    OURS_OFF,
    OURS_ON,
    pct,
    point_figures,
    report_markdown,
    summarize,
)

IDS = cp.id_range(32000)


def test_system_prompt_is_shared_within_a_phase_and_new_across_phases_and_rounds():
    first = cp.system_prompt(0, 0, "single", 400, IDS)
    assert first == cp.system_prompt(0, 0, "single", 400, IDS)  # every client's
    assert len(first) == 400 and all(IDS[0] <= i < IDS[1] for i in first)
    others = [cp.system_prompt(0, 0, "multi", 400, IDS), cp.system_prompt(0, 1, "single", 400,
                                                                           IDS),
              cp.system_prompt(0, 0, "warmup", 400, IDS), cp.system_prompt(1, 0, "single", 400,
                                                                           IDS)]
    assert all(o[:16] != first[:16] for o in others)  # nothing for a cache to share


def test_user_turns_differ_by_client_chat_and_turn():
    turns = {(c, chat, t): tuple(cp.user_turn(0, 0, "multi", c, chat, t, 50, IDS))
             for c in range(8) for chat in range(2) for t in range(3)}
    assert len(set(turns.values())) == len(turns)
    assert all(len(t) == 50 for t in turns.values())


def test_a_multi_turn_chat_resends_its_history():
    system = cp.system_prompt(0, 0, "multi", 40, IDS)
    prompts = [system + cp.user_turn(0, 0, "multi", 3, 0, 0, 5, IDS)]
    for turn in (1, 2):
        reply = list(range(100 + turn, 107 + turn))
        prompts.append(cp.next_prompt(prompts[-1], reply,
                                      cp.user_turn(0, 0, "multi", 3, 0, turn, 5, IDS)))
    for before, after in zip(prompts, prompts[1:]):
        assert after[:len(before)] == before and len(after) == len(before) + 7 + 5
    other_client = system + cp.user_turn(0, 0, "multi", 4, 0, 0, 5, IDS)
    assert other_client[:40] == prompts[0][:40] and other_client != prompts[0]


def test_small_vocabularies_get_ids_inside_them():
    low, high = cp.id_range(512)
    assert 0 <= low < high <= 512
    assert cp.id_range(32000) == cp.ID_RANGE


def test_llama_server_gets_the_prompt_cache_and_a_whole_chat_per_slot():
    args = cp.parse_args(["--out", "/nonexistent/x.json"])  # the defaults
    need = cp.chat_context(args)
    assert need == 400 + 3 * (50 + 64) + cp.RETOKENIZE_MARGIN
    flags = cp.llama_flags(args.clients, need)
    assert "--cache-prompt" in flags and "--no-cache-prompt" not in flags
    slots = int(flags[flags.index("-np") + 1])
    ctx = int(flags[flags.index("-c") + 1])
    assert slots == 64 and ctx % slots == 0 and ctx // slots >= need
    assert flags[:4] == cp.LLAMA_FLAGS[:4]  # the anchors' thread flags kept


@given(st.integers(1, 512), st.integers(1, 65536), st.integers(1, 1 << 20))
def test_the_budget_holds_exactly_the_slots_it_was_made_from(slots, max_len, per_token):
    gib = float(repr(cp.slots_budget_gib(slots, max_len, per_token)))  # as the flag sends it
    assert int(gib * 2**30 // (max_len * per_token)) == slots


def test_parse_args_refuses_what_cannot_run(tmp_path, capsys):
    def refused(*argv: str) -> str:  # the one-line reason (so each case fails for its own)
        with pytest.raises(SystemExit):
            cp.parse_args(list(argv))
        return capsys.readouterr().err.splitlines()[-1]

    # 400 + 3 turns do not fit the test preset's 128 tokens
    assert "context" in refused("--model", "test", "--out", str(tmp_path / "a.json"))
    assert "ends in .md" in refused("--out", str(tmp_path / "a.md"))
    (tmp_path / "b.md").write_text("someone's")
    assert "exists" in refused("--out", str(tmp_path / "b.json"))
    assert "--clients" in refused("--clients", "0", "--out", str(tmp_path / "c.json"))


# ---- the report ----
def records(ttfts_ms, tokens=8, failed=0):
    return [{"ttft_s": t / 1e3, "completion_tokens": tokens, "prompt_tokens": 40,
             "error": None} for t in ttfts_ms] + \
        [{"ttft_s": None, "completion_tokens": 0, "prompt_tokens": 40, "error": "boom"}] * failed


def point(rnd, arm, ttft_ms, tok, phase="single", wall=2.0, hits=None):
    return {"round": rnd, "arm": arm, "phase": phase, "wall_s": wall,
            "records": records([ttft_ms] * 4, tokens=tok),
            "prefix_cache_queries": None if hits is None else 100,
            "prefix_cache_hits": hits, "loadavg_before": [1.0 + rnd, 0, 0],
            "loadavg_after": [2.0 + rnd, 0, 0]}


def result(points, clients=64, flag=True, memory=()):
    return {"points": points, "memory": list(memory), "prefix_caching_flag": flag,
            "llama_server": None, "llama_skipped": "test", "command": "python chat_prefix.py",
            "started_utc": "2026-11-30T10:00:00+00:00", "finished_utc": "2026-11-30T10:20:00",
            "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "torch_threads": 2},
            "protocol": {"model": "transformer-64m", "clients": clients, "system_len": 400,
                         "user_len": 50, "max_tokens": 8, "chats": 3, "turns": 3,
                         "rounds": 2, "memory_slots": 8, "memory_chats": 256,
                         "memory_prompt_len": 50}}


def test_percentiles_interpolate_between_order_statistics():
    xs = [40.0, 10.0, 30.0, 20.0]
    assert pct(xs, 50) == 25.0 and pct(xs, 0) == 10.0 and pct(xs, 100) == 40.0
    assert pct(xs, 99) == pytest.approx(39.7) and pct([], 50) is None


def test_point_figures_count_only_what_succeeded():
    p = {"wall_s": 4.0, "records": records([10, 30, 20], tokens=8, failed=2)
         + records([50], tokens=3), "prefix_cache_queries": 200, "prefix_cache_hits": 150}
    f = point_figures(p, max_tokens=8)
    assert f["requests"] == 6 and f["failed"] == 2 and f["short_outputs"] == 1
    assert f["ttft_ms_p50"] == pytest.approx(25.0)
    assert f["output_tok_s"] == pytest.approx((3 * 8 + 3) / 4.0)
    assert f["prefix_hit_rate"] == 0.75


def test_ratios_are_same_round_and_targets_judged_at_64_clients_only():
    # round 0: on 100 ms / 400 tok, off 400 ms / 200 tok; round 1: on 100 / 300, off 200 / 300
    pts = [point(0, OURS_ON, 100, 400), point(0, OURS_OFF, 400, 200),
           point(1, OURS_ON, 100, 300), point(1, OURS_OFF, 200, 300)]
    s = summarize(result(pts))
    ratio = {r["ratio"]: r["value"] for r in s["ratios"]}
    assert ratio["TTFT p50, caching off / on"] == 3.0  # median of 4.0 and 2.0
    assert ratio["output tok/s, caching on / off"] == 1.5  # median of 2.0 and 1.0
    met = {t["target"]: t["met"] for t in s["targets"]}
    assert met == {"single: TTFT p50, caching off / on": True,
                   "single: output tok/s, caching on / off": True}
    assert summarize(result(pts, clients=4))["targets"] == []
    assert summarize(result(pts, flag=False))["targets"] == []  # the same server twice
    assert s["loadavg_1min"] == [1.0, 3.0]


def test_llama_ratios_read_how_far_ours_leads():
    pts = [point(0, OURS_ON, 100, 400), point(0, LLAMA, 250, 320, hits=None)]
    s = summarize(result(pts, flag=False))
    ratio = {r["ratio"]: r["value"] for r in s["ratios"]}
    assert ratio["TTFT p50, llama-server / ours (caching on)"] == 2.5
    assert ratio["output tok/s, ours (caching on) / llama-server"] == 1.25
    assert all(t["met"] for t in s["targets"]) and len(s["targets"]) == 2


def test_memory_ratio_is_the_median_of_same_round_ratios():
    mem = [{"round": r, "arm": arm, "flags": ["--x"], "kv_cache_gib": 0.5, "max_running": n,
            "median_running_while_waiting": n, "preemptions": 0, "failed": 0,
            "loadavg_before": [1.0, 0, 0], "loadavg_after": [1.0, 0, 0]}
           for r, arm, n in ((0, "slots", 8), (0, "token budget", 40),
                             (1, "slots", 8), (1, "token budget", 24))]
    s = summarize(result([point(0, OURS_ON, 100, 400)], memory=mem))
    assert s["memory"]["ratio"] == 4.0  # median of 5.0 and 3.0
    assert {t["target"]: t["met"] for t in s["targets"]} == {
        "concurrent short chats, token budget / slots": True}


def test_markdown_shows_the_figures_and_verdicts():
    pts = [point(r, arm, ttft, tok, hits=60 if arm == OURS_ON else None)
           for r in (0, 1) for arm, ttft, tok in ((OURS_ON, 100, 400), (OURS_OFF, 200, 200))]
    res = result(pts)
    res["summary"] = summarize(res)
    md = report_markdown(res)
    assert "| single | ours caching on | 100 | 100 | 800.0 | 40 | 60 % | 0 / 0 |" in md
    assert "| single | TTFT p50, caching off / on | 2.00 | ≥ 3.0: **missed** |" in md
    assert "| single | output tok/s, caching on / off | 2.00 | ≥ 1.5: **met** |" in md
    assert "Targets measured: 2, met 1, missed 1." in md
    res = result(pts, flag=False)
    res["summary"] = summarize(res)
    assert "the two arms of ours are the same server" in report_markdown(res)


def test_counters_and_gauges_are_read_from_real_prometheus_text():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    hits = Counter("vllm:prefix_cache_hits", "h", ["model_name"], registry=registry)
    hits.labels(model_name="bench").inc(96)
    Gauge("vllm:num_requests_running", "r", ["model_name"],
          registry=registry).labels(model_name="bench").set(7)
    m = cp.parse_metrics(generate_latest(registry).decode())
    assert cp.counter(m, "vllm:prefix_cache_hits") == 96
    assert m["vllm:num_requests_running"] == 7
    assert cp.counter(m, "vllm:prefix_cache_queries") is None  # absent: reported as such


def test_waves_split_ttft_by_chat_and_turn_with_same_round_ratios():
    """Wave n = each client's n-th chat (single) or turn (multi); per wave the median over
    rounds of TTFT p50 and of the same-round caching off / on ratio."""
    def wave_point(rnd, arm, phase, ttfts_by_wave):
        key = "chat" if phase == "single" else "turn"
        recs = [{"ttft_s": t / 1e3, "completion_tokens": 8, "prompt_tokens": 40,
                 "error": None, key: wave} for wave, ts in enumerate(ttfts_by_wave) for t in ts]
        return {**point(rnd, arm, 0, 8, phase=phase), "records": recs}

    pts = [wave_point(0, OURS_ON, "single", [[100, 100, 300], [50]]),
           wave_point(0, OURS_OFF, "single", [[800, 800, 900], [100]]),
           wave_point(1, OURS_ON, "single", [[200, 200], [50]]),
           wave_point(1, OURS_OFF, "single", [[400, 400], [50]]),
           wave_point(0, OURS_ON, "multi", [[10], [20]])]
    res = result(pts)
    res["summary"] = summarize(res)
    waves = {(w["phase"], w["wave"]): w for w in res["summary"]["waves"]}
    assert waves["single", 0]["ttft_ms_p50"][OURS_ON] == 150  # median of 100 and 200
    assert waves["single", 0]["off_over_on"] == 5.0  # median of 8.0 and 2.0
    assert waves["single", 1]["off_over_on"] == 1.5  # median of 2.0 and 1.0
    assert waves["multi", 1]["ttft_ms_p50"] == {OURS_ON: 20} and waves["multi", 1][
        "off_over_on"] is None
    md = report_markdown(res)
    assert "| single | 0 | 150 | 600 | 5.00 |" in md and "| multi | 1 | 20 | – | – |" in md


def test_a_saved_run_is_re_reported_by_the_current_code(tmp_path, capsys):
    """`python bench/chat_prefix_report.py RUN.json` recomputes the summary (waves included)
    from the records, whatever summary the file holds."""
    import chat_prefix_report

    pts = [point(r, arm, ttft, tok) for r in (0, 1)
           for arm, ttft, tok in ((OURS_ON, 100, 400), (OURS_OFF, 300, 200))]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({**result(pts), "summary": {"stale": True}}))
    assert chat_prefix_report.main([str(saved)]) == 0
    out = capsys.readouterr().out
    assert "| single | TTFT p50, caching off / on | 3.00 | ≥ 3.0: **met** |" in out
    with pytest.raises(SystemExit):
        chat_prefix_report.main([str(tmp_path / "missing.json")])
