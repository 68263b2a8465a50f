"""The chat-prefix run's figures, same-round ratios and targets, as a dict and as Markdown.

Per (phase, arm, round): TTFT p50/p99 over the requests that succeeded, output tok/s (their
completion tokens / the phase's wall time), the prefix-cache hit rate from ours' /metrics.
Medians over rounds; each ratio is taken within a round (both arms of that round, minutes
apart) and the median over rounds is reported, as bench/side_by_side_report.py does.
Targets are issue 12's and are judged only on its protocol (64 clients): caching on vs off
needs a server that can turn caching off, and llama-server's only where it ran. Knows only
the result dict that bench/chat_prefix.py builds; no servers, no torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from side_by_side_report import median_or_none  # bench/ is on sys.path as a script

OURS_ON, OURS_OFF, LLAMA = "ours caching on", "ours caching off", "llama-server"
ARMS = (OURS_ON, OURS_OFF, LLAMA)
PHASES = ("single", "multi")
ISSUE_CLIENTS = 64
# name -> (numerator arm, denominator arm, figure, least): each reads "how many times better
# the arm that should win is" (a TTFT's loser is the numerator, a tok/s' winner)
RATIOS = {
    "TTFT p50, caching off / on": (OURS_OFF, OURS_ON, "ttft_ms_p50", 3.0),
    "output tok/s, caching on / off": (OURS_ON, OURS_OFF, "output_tok_s", 1.5),
    "TTFT p50, llama-server / ours (caching on)": (LLAMA, OURS_ON, "ttft_ms_p50", 1.0),
    "output tok/s, ours (caching on) / llama-server": (OURS_ON, LLAMA, "output_tok_s", 1.0),
}
MEMORY_TARGET = 4.0  # token budget / slots, most concurrent short chats


def pct(xs: list[float], p: float) -> float | None:
    """The p-th percentile, linear between order statistics (as the anchors' load.py)."""
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def point_figures(point: dict, max_tokens: int) -> dict:
    """One (phase, arm, round) measurement's figures from its per-request records."""
    ok = [r for r in point["records"] if not r["error"]]
    ttft = [r["ttft_s"] * 1e3 for r in ok]
    queries, hits = point.get("prefix_cache_queries"), point.get("prefix_cache_hits")
    return {"requests": len(point["records"]), "failed": len(point["records"]) - len(ok),
            "short_outputs": sum(1 for r in ok if r["completion_tokens"] < max_tokens),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "output_tok_s": sum(r["completion_tokens"] for r in ok) / point["wall_s"]
            if point["wall_s"] > 0 else None,
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok)
            if ok else None,
            "prefix_hit_rate": hits / queries if queries else None}


def summarize(result: dict) -> dict:
    """Medians per (phase, arm), same-round ratios, the memory figures, measured targets."""
    by = defaultdict(dict)  # (phase, arm) -> {round: figures}
    for p in result["points"]:
        by[p["phase"], p["arm"]][p["round"]] = point_figures(p, result["protocol"]["max_tokens"])
    by = dict(sorted(by.items(), key=lambda item: (_rank(PHASES, item[0][0]),
                                                   _rank(ARMS, item[0][1]))))
    points = [{"phase": phase, "arm": arm, "rounds": len(rounds),
               **{k: median_or_none(f[k] for f in rounds.values())
                  for k in ("ttft_ms_p50", "ttft_ms_p99", "output_tok_s", "prompt_tokens_mean",
                            "prefix_hit_rate")},
               "failed": sum(f["failed"] for f in rounds.values()),
               "short_outputs": sum(f["short_outputs"] for f in rounds.values())}
              for (phase, arm), rounds in by.items()]
    judged = result["protocol"]["clients"] == ISSUE_CLIENTS
    ratios, targets = [], []
    for phase in dict.fromkeys(p["phase"] for p in result["points"]):
        for name, (a, b, key, least) in RATIOS.items():
            first, second = by.get((phase, a)), by.get((phase, b))
            if not first or not second:
                continue
            value = median_or_none(first[r][key] / second[r][key] for r in first
                            if r in second and first[r][key] and second[r][key])
            ratios.append({"phase": phase, "ratio": name, "value": value})
            same_server = OURS_OFF in (a, b) and not result.get("prefix_caching_flag")
            if judged and value is not None and not same_server:
                targets.append({"target": f"{phase}: {name}", "value": value, "least": least,
                                "met": value >= least})
    memory = summarize_memory(result.get("memory") or [])
    if judged and memory.get("ratio") is not None:
        targets.append({"target": "concurrent short chats, token budget / slots",
                        "value": memory["ratio"], "least": MEMORY_TARGET,
                        "met": memory["ratio"] >= MEMORY_TARGET})
    waves = summarize_waves(result["points"])
    loads = [x for p in result["points"] + (result.get("memory") or [])
             for x in (p["loadavg_before"][0], p["loadavg_after"][0])]
    return {"points": points, "ratios": ratios, "memory": memory, "targets": targets,
            "judged": judged, "waves": waves,
            "loadavg_1min": [min(loads), max(loads)] if loads else None}


def summarize_waves(points: list[dict]) -> list[dict]:
    """TTFT p50 per wave: a client's n-th chat (single) or n-th turn (multi). Every client
    starts its first at once, so wave 0 of the single phase is one burst of one chat per
    client; later waves start when each client's previous one ends. Medians over rounds,
    and the same-round caching off / on ratio per wave."""
    by = defaultdict(lambda: defaultdict(dict))  # (phase, wave) -> arm -> {round: p50}
    for p in points:
        key = "chat" if p["phase"] == "single" else "turn"
        waves = defaultdict(list)
        for r in p["records"]:
            if not r["error"] and key in r:
                waves[r[key]].append(r["ttft_s"] * 1e3)
        for wave, ttft in waves.items():
            by[p["phase"], wave][p["arm"]][p["round"]] = pct(ttft, 50)
    out = []
    for (phase, wave), arms in sorted(by.items(), key=lambda i: (_rank(PHASES, i[0][0]),
                                                                 i[0][1])):
        on, off = arms.get(OURS_ON, {}), arms.get(OURS_OFF, {})
        out.append({"phase": phase, "wave": wave,
                    "ttft_ms_p50": {arm: median_or_none(rounds.values())
                                    for arm, rounds in arms.items()},
                    "off_over_on": median_or_none(off[r] / on[r] for r in on
                                                  if r in off and on[r])})
    return out


def summarize_memory(memory: list[dict]) -> dict:
    """Medians per arm and the median over rounds of that round's token budget / slots."""
    by = defaultdict(dict)  # arm -> {round: point}
    for p in memory:
        by[p["arm"]][p["round"]] = p
    arms = {arm: {k: median_or_none(p[k] for p in rounds.values())
                  for k in ("max_running", "median_running_while_waiting", "preemptions")}
            | {"failed": sum(p["failed"] for p in rounds.values()),
               "flags": next(iter(rounds.values()))["flags"]}
            for arm, rounds in by.items()}
    slots, paged = by.get("slots", {}), by.get("token budget", {})
    ratio = median_or_none(paged[r]["max_running"] / slots[r]["max_running"]
                    for r in paged if r in slots and slots[r]["max_running"])
    gib = next((p["kv_cache_gib"] for p in memory), None)
    return {"arms": arms, "ratio": ratio, "kv_cache_gib": gib} if memory else {}


def _rank(values, x) -> int:
    return values.index(x) if x in values else len(values)


def _fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def report_markdown(result: dict) -> str:
    s, proto, m = result["summary"], result["protocol"], result["machine"]
    llama = result.get("llama_server")
    low, high = s["loadavg_1min"] or (None, None)
    lines = [
        f"## Chat with a shared system prompt, {result['started_utc'][:10]}", "",
        f"`{result['command']}`", "",
        f"- When: {result['started_utc']} to {result['finished_utc']} (UTC); 1-minute load "
        f"average before/after the measurements {_fmt(low, 2)}–{_fmt(high, 2)}.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, shared by the server under load and this "
        f"process's client; torch {m['torch']} ({m['torch_threads']} threads).",
        f"- Model: {proto['model']}, random weights, bf16 (ours) / f16 GGUF (llama-server: "
        + (f"{llama['version'].splitlines()[0]}, flags {' '.join(llama['flags'])})" if llama
           else f"skipped, {result['llama_skipped']})") + ".",
        f"- Load: {proto['clients']} clients; a {proto['system_len']}-token system prompt "
        f"shared by all, {proto['user_len']}-token user turns, {proto['max_tokens']} new "
        f"tokens, greedy, EOS ignored, streaming, token ids. Single: {proto['chats']} one-turn "
        f"chats per client; multi: one {proto['turns']}-turn chat per client, each turn "
        f"resending the whole history. Medians of {proto['rounds']} round(s).",
    ]
    if not result.get("prefix_caching_flag"):
        lines.append("- **This server has no `--no_prefix_caching`: the two arms of ours are "
                     "the same server, and their ratios measure noise.**")
    lines += ["", "| phase | arm | TTFT p50 ms | TTFT p99 ms | output tok/s | mean prompt "
              "tokens | prefix-cache hits | failed / short |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in s["points"]:
        lines.append(f"| {p['phase']} | {p['arm']} | {_fmt(p['ttft_ms_p50'], 0)} | "
                     f"{_fmt(p['ttft_ms_p99'], 0)} | {_fmt(p['output_tok_s'])} | "
                     f"{_fmt(p['prompt_tokens_mean'], 0)} | "
                     f"{_fmt(p['prefix_hit_rate'] and 100 * p['prefix_hit_rate'], 0)}"
                     f"{'' if p['prefix_hit_rate'] is None else ' %'} | "
                     f"{p['failed']} / {p['short_outputs']} |")
    met = {t["target"]: t for t in s["targets"]}
    lines += ["", "| phase | ratio (same round, median over rounds) | value | target |",
              "|---|---|---:|---|"]
    for r in s["ratios"]:
        t = met.get(f"{r['phase']}: {r['ratio']}")
        lines.append(f"| {r['phase']} | {r['ratio']} | {_fmt(r['value'], 2)} | "
                     + ("" if t is None else f"≥ {t['least']}: **"
                        f"{'met' if t['met'] else 'missed'}**") + " |")
    if s.get("waves"):
        arms = [a for a in ARMS if any(a in w["ttft_ms_p50"] for w in s["waves"])]
        lines += ["", "TTFT p50 ms by wave (a client's n-th chat in the single phase, its "
                  "n-th turn in the multi phase; all clients start their first at once):", "",
                  "| phase | wave | " + " | ".join(arms) + " | caching off / on |",
                  "|---|---:|" + "---:|" * (len(arms) + 1)]
        for w in s["waves"]:
            lines.append(f"| {w['phase']} | {w['wave']} | "
                         + " | ".join(_fmt(w["ttft_ms_p50"].get(a), 0) for a in arms)
                         + f" | {_fmt(w['off_over_on'], 2)} |")
    mem = s["memory"]
    if mem:
        lines += ["", f"Memory: the same KV budget, {mem['kv_cache_gib'] * 1024:.4g} MiB "
                  f"({proto['memory_slots']} slots of max_model_len), "
                  f"{proto['memory_chats']} short chats at once ({proto['memory_prompt_len']}"
                  f"-token unique prompts, {proto['max_tokens']} new tokens).", "",
                  "| arm | flags | most running | median running while others waited | "
                  "preemptions | failed |", "|---|---|---:|---:|---:|---:|"]
        for arm, a in mem["arms"].items():
            lines.append(f"| {arm} | `{' '.join(a['flags'])}` | {_fmt(a['max_running'], 0)} | "
                         f"{_fmt(a['median_running_while_waiting'], 0)} | "
                         f"{_fmt(a['preemptions'], 0)} | {a['failed']} |")
        lines.append(f"\nToken budget / slots, most running: {_fmt(mem['ratio'], 2)}.")
    if s["judged"]:
        n_met = sum(t["met"] for t in s["targets"])
        lines.append(f"\nTargets measured: {len(s['targets'])}, met {n_met}, missed "
                     f"{len(s['targets']) - n_met}.")
    else:
        lines.append(f"\nNot issue 12's protocol ({proto['clients']} clients, not "
                     f"{ISSUE_CLIENTS}): no target is judged.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Re-read a saved run's JSON and print its report, recomputed by this code."""
    p = argparse.ArgumentParser(description="Print the report of a bench/chat_prefix.py run "
                                "from its JSON (recomputed, so later report code applies).")
    p.add_argument("json", type=Path)
    args = p.parse_args(argv)
    try:
        result = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {args.json}: {e}")
    result["summary"] = summarize(result)
    print(report_markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
