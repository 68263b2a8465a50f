"""The side-by-side run's medians, same-run ratios and targets, as a dict and as Markdown.

Ratios are taken within a round (ours / llama-server on the same point, minutes apart, both
servers fresh in that round) and the median over rounds is reported, so drift between rounds
cancels out. Targets are the issue's (issue 11, part 6); a target whose point was not
measured (e.g. 64 streams in a rehearsal) is left out, not counted as met. Knows only the
result dict that bench/side_by_side.py builds; no servers, no torch.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

OURS, LLAMA = "fanformer-serve", "llama-server"
ANCHOR_NAMES = {"bf16": "bf16 vs f16", "4bit": "rtn 4-bit g128 (int8 head) vs q4_0"}
# (variant, streams) -> least ours / llama-server, greedy and sampled alike
PAIR_TARGETS = {("bf16", 16): 1.0, ("bf16", 64): 1.5,
                ("4bit", 1): 0.6, ("4bit", 16): 1.0, ("4bit", 64): 1.3}
CEILING_TARGET = ("transformer-64m", 0.8)  # bf16 at 1 stream / the linear-only ceiling
SAMPLED_TARGET = ("fanformer-92m", 64, 0.9)  # model, streams, least sampled / greedy (ours)


def median_or_none(xs):
    """The median of the measured values (None where a point failed), 3 decimals."""
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def summarize(result: dict) -> dict:
    """Medians per point, same-run ratios, and every target that was measured."""
    by = defaultdict(dict)  # (model, variant, mode, streams, server) -> {round: point}
    for p in result["points"]:  # in measuring order: models, variants, modes, streams
        by[p["model"], p["variant"], p["mode"], p["streams"], p["server"]][p["round"]] = p
    by = dict(sorted(by.items(), key=_order(result["points"])))
    points = []
    for (model, variant, mode, streams, server), rounds in by.items():
        points.append({"model": model, "variant": variant, "mode": mode, "streams": streams,
                       "server": server, "rounds": len(rounds),
                       **{k: median_or_none(p[k] for p in rounds.values())
                          for k in ("output_tok_s", "ttft_ms_p50", "tpot_ms_p50")}})

    def per_round(a, b):  # median over rounds of a / b, rounds where both were measured
        return median_or_none(a[r]["output_tok_s"] / b[r]["output_tok_s"]
                       for r in a if r in b and b[r]["output_tok_s"])

    ratios, targets = [], []
    for (model, variant, mode, streams, server), rounds in by.items():
        if server != OURS:
            continue
        llama = by.get((model, variant, mode, streams, LLAMA))
        greedy = by.get((model, variant, "greedy", streams, OURS))
        row = {"model": model, "variant": variant, "mode": mode, "streams": streams,
               "vs_llama": per_round(rounds, llama) if llama else None,
               "sampled_vs_greedy": per_round(rounds, greedy)
               if mode == "sampled" and greedy else None}
        ratios.append(row)
        if row["vs_llama"] is not None and (variant, streams) in PAIR_TARGETS:
            targets.append(_target(_pair_name(variant, mode, streams), row["vs_llama"],
                                   PAIR_TARGETS[variant, streams]))
        if row["sampled_vs_greedy"] is not None and (model, streams) == SAMPLED_TARGET[:2]:
            targets.append(_target(_sampled_name(model, variant, streams),
                                   row["sampled_vs_greedy"], SAMPLED_TARGET[2]))
    ceilings = {}
    for model in dict.fromkeys(c["model"] for c in result["ceilings"]):
        mine = [c for c in result["ceilings"] if c["model"] == model]
        entry = {"tok_s": median_or_none(c["tok_s"] for c in mine),
                 "threads": mine[0]["threads"],
                 "kernel": mine[0].get("kernel", "torch")}  # runs before 2026-12-01: torch
        for mode in ("greedy", "sampled"):
            ours = by.get((model, "bf16", mode, 1, OURS))
            if ours:
                entry[mode] = median_or_none(ours[r]["output_tok_s"] / c
                                             for r in ours
                                             if (c := _ceiling_tok_s(mine, r, mode)))
                if model == CEILING_TARGET[0]:
                    targets.append(_target(_ceiling_name(model, mode), entry[mode],
                                           CEILING_TARGET[1]))
        ceilings[model] = entry
    loads = [p["loadavg_before"][0] for p in result["points"]]
    return {"points": points, "ratios": ratios, "ceilings": ceilings, "targets": targets,
            "loadavg_1min": [min(loads), max(loads)] if loads else None,
            "flagged": [f"round {p['round']} {p['model']} {p['variant']} {p['mode']} "
                        f"{p['streams']} streams {p['server']}: failed {p['failed']}, short "
                        f"{p['short_outputs']}" for p in result["points"]
                        if p["failed"] or p["short_outputs"]],
            "idle_server_cpu_s_max": max((p["idle_server_cpu_s"] for p in result["points"]),
                                         default=None)}


def _ceiling_tok_s(ceilings: list[dict], rnd: int, mode: str) -> float | None:
    """The ceiling a round's 1-stream point is judged by: the mean of those measured right
    before and after it; in runs before 2026-12-01 (no "mode"), the round's one ceiling."""
    adjacent = [c["tok_s"] for c in ceilings if c["round"] == rnd and c.get("mode") == mode]
    if not adjacent:
        adjacent = [c["tok_s"] for c in ceilings if c["round"] == rnd and "mode" not in c]
    return statistics.mean(adjacent) if adjacent else None


def _order(points: list[dict]):
    """Sort key for (model, variant, mode, streams, server): models as first measured, then
    bf16 before 4bit, greedy before sampled, streams ascending, our server first."""
    models = list(dict.fromkeys(p["model"] for p in points))
    variants, modes, servers = ["bf16", "4bit"], ["greedy", "sampled"], [OURS, LLAMA]

    def rank(values, x):
        return values.index(x) if x in values else len(values)
    return lambda item: (rank(models, item[0][0]), rank(variants, item[0][1]),
                         rank(modes, item[0][2]), item[0][3], rank(servers, item[0][4]))


def _pair_name(variant: str, mode: str, streams: int) -> str:
    return f"{ANCHOR_NAMES[variant]}, {mode}, {streams} streams: ours / llama-server"


def _ceiling_name(model: str, mode: str) -> str:
    return f"{model} bf16, {mode}, 1 stream: ours / linear-only ceiling"


def _sampled_name(model: str, variant: str, streams: int) -> str:
    return f"{model} {variant}, {streams} streams: sampled / greedy"


def _target(name: str, value: float, least: float) -> dict:
    return {"target": name, "value": value, "least": least, "met": value >= least}


def _fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def report_markdown(result: dict) -> str:
    s = result["summary"]
    med = {(p["model"], p["variant"], p["mode"], p["streams"], p["server"]): p
           for p in s["points"]}
    ratio = {(r["model"], r["variant"], r["mode"], r["streams"]): r for r in s["ratios"]}
    met = {t["target"]: t for t in s["targets"]}
    m = result["machine"]
    llama = result["llama_server"]
    anchor = (f"{llama['version'].splitlines()[0]}, flags {' '.join(llama['flags'])}" if llama
              else f"skipped ({result['llama_skipped']})")
    low, high = s["loadavg_1min"] or (None, None)
    requests = ", ".join(f"{n} at {c} stream{'s' * (int(c) > 1)}"
                         for c, n in result["protocol"]["requests"].items())
    lines = [
        f"## Side by side, {result['started_utc'][:10]}",
        "",
        f"`{result['command']}`",
        "",
        f"- When: {result['started_utc']} to {result['finished_utc']} (UTC); 1-minute load "
        f"average before the points {_fmt(low, 2)}–{_fmt(high, 2)}.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, shared by the servers (one under load at a "
        f"time) and the load generator; torch {m['torch']} "
        f"({m['torch_threads']} threads); environment {m['env'] or 'unset'}.",
        f"- Anchor: {anchor}.",
        f"- Load: {result['protocol']['load_generator']}; {result['protocol']['prompt_len']}-"
        f"token prompts as token ids, {result['protocol']['max_tokens']} new tokens, EOS "
        f"ignored, streaming; requests per point {requests}; medians of "
        f"{result['protocol']['rounds']} round(s); ratios are the median over rounds of the "
        "same round's ratio.",
        "",
    ]
    anchored = list(dict.fromkeys(k[:4] for k in med if k[4] == LLAMA))
    if anchored:
        lines += ["| pair | mode | streams | ours tok/s | llama-server tok/s | ours / llama "
                  "| target | ours TTFT / TPOT p50 ms | llama TTFT / TPOT p50 ms |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|"]
        for model, variant, mode, streams in anchored:
            o, a = med.get((model, variant, mode, streams, OURS)), \
                med[model, variant, mode, streams, LLAMA]
            r = ratio.get((model, variant, mode, streams), {}).get("vs_llama")
            t = met.get(_pair_name(variant, mode, streams))
            lines.append(f"| {ANCHOR_NAMES[variant]} | {mode} | {streams} | "
                         f"{_fmt(o and o['output_tok_s'])} | {_fmt(a['output_tok_s'])} | "
                         f"{_fmt(r, 2)} | {_verdict(t)} | {_lat(o)} | {_lat(a)} |")
        lines.append("")
    for model, c in s["ceilings"].items():
        vs = ", ".join(f"{mode} {_fmt(c[mode], 2)}"
                       f"{_verdict_suffix(met.get(_ceiling_name(model, mode)))}"
                       for mode in ("greedy", "sampled") if c.get(mode) is not None)
        lines.append(f"- {model} linear-only ceiling (batch 1, bf16, {c['kernel']} kernel, "
                     f"{c['threads']} thread(s)): {_fmt(c['tok_s'])} tok/s; ours bf16 at 1 "
                     f"stream / ceiling: {vs or 'not measured'}.")
    own = [k for k in dict.fromkeys(k[:4] for k in med if k[4] == OURS) if k not in anchored]
    if own:
        lines += ["", "Our server alone (not compared with llama-server):", "",
                  "| model | variant | mode | streams | tok/s | TTFT / TPOT p50 ms "
                  "| sampled / greedy | target |", "|---|---|---|---:|---:|---:|---:|---|"]
        for model, variant, mode, streams in own:
            o = med[model, variant, mode, streams, OURS]
            r = ratio.get((model, variant, mode, streams), {}).get("sampled_vs_greedy")
            t = met.get(_sampled_name(model, variant, streams))
            lines.append(f"| {model} | {variant} | {mode} | {streams} | "
                         f"{_fmt(o['output_tok_s'])} | {_lat(o)} | {_fmt(r, 2)} | "
                         f"{_verdict(t)} |")
    n_met = sum(t["met"] for t in s["targets"])
    lines += ["", f"Targets measured: {len(s['targets'])}, met {n_met}, missed "
              f"{len(s['targets']) - n_met}." + "".join(
                  f"\n- missed: {t['target']} = {t['value']:.2f} (target ≥ {t['least']})"
                  for t in s["targets"] if not t["met"])]
    if s["flagged"]:
        lines += ["", "Points with failed or short outputs (their figures are suspect):"] + \
            [f"- {f}" for f in s["flagged"]]
    lines.append(f"\nMost CPU an idle server used while the other was measured: "
                 f"{_fmt(s['idle_server_cpu_s_max'], 2)} s.")
    return "\n".join(lines) + "\n"


def _lat(p) -> str:
    return "–" if not p else f"{_fmt(p['ttft_ms_p50'], 0)} / {_fmt(p['tpot_ms_p50'], 1)}"


def _verdict(t) -> str:
    return "" if t is None else f"≥ {t['least']}: **{'met' if t['met'] else 'missed'}**"


def _verdict_suffix(t) -> str:
    return "" if t is None else f" (≥ {t['least']}: {'met' if t['met'] else 'missed'})"
