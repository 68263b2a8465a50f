"""The ablation study's report: final bits/byte per arm, paired differences to the dense arm,
eval curves, and tokens-to-reach-a-loss; written as report.md, report.json and curves.png.

Reads only what `fanformer-train` wrote (each run's metrics.jsonl) and the study's
manifest; `bench/study.py` calls `write_report` at the end of every invocation, and
`python bench/study.py --report_only` redraws it. The maths (`mean_sd`,
`paired_differences`, `tokens_to_reach`, `summarize`) takes plain numbers, so the tests
run it on synthetic metrics. Only finished runs count.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from pathlib import Path

BASELINE = "dense"
#: default tokens-to-loss targets: the dense arm's curves at these shares of their points
TARGET_SHARES = (0.25, 0.5, 1.0)


# ---- files ----
def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename): a study
    killed mid-write keeps the previous version."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


# ---- reading runs ----
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_metrics(run_dir: Path) -> dict | None:
    """The run's final full-eval line (None while it has not finished)."""
    finals = [r for r in read_metrics(run_dir) if r.get("final")]
    if not finals:
        return None
    last = finals[-1]
    return {k: last[k] for k in ("step", "tokens", "eval_cross_entropy", "eval_bits_per_byte")}


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(tokens, eval bits/byte on the first --eval_tokens) of the periodic evals; after a
    resume a step can be logged twice, and the later line wins."""
    points = {r["tokens"]: r["eval_bits_per_byte"] for r in read_metrics(run_dir)
              if "eval_bits_per_byte" in r and not r.get("final")}
    return sorted(points.items())


# ---- the maths ----
def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; NaN below two values)."""
    n = len(values)
    return {"mean": statistics.fmean(values) if n else math.nan,
            "sd": statistics.stdev(values) if n > 1 else math.nan, "n": n}


def paired_differences(by_seed: dict[str, dict[int, float]], baseline: str = BASELINE
                       ) -> dict[str, dict]:
    """arm -> {"diffs": {seed: arm - baseline}, mean, sd, n} over the seeds both arms have:
    a pair shares its data order and init seed, so the seed-to-seed noise cancels."""
    base = by_seed.get(baseline, {})
    out = {}
    for arm, values in by_seed.items():
        diffs = {seed: v - base[seed] for seed, v in sorted(values.items()) if seed in base}
        out[arm] = {"diffs": diffs, **mean_sd(list(diffs.values()))}
    return out


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which `curve` (tokens, loss) first reaches `target`, linearly interpolated
    between the last point above it and the first at or below; the first point's tokens if
    that one is already below (an upper bound), None if never reached."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> dict:
    """Pointwise mean, min and max over curves, on the tokens all of them have."""
    common = sorted(set.intersection(*(set(t for t, _ in c) for c in curves))) if curves else []
    maps = [dict(c) for c in curves]
    rows = [[m[t] for m in maps] for t in common]
    return {"tokens": common, "mean": [statistics.fmean(r) for r in rows],
            "min": [min(r) for r in rows], "max": [max(r) for r in rows]}


def default_targets(baseline: dict) -> list[float]:
    """Losses every dense seed has reached by TARGET_SHARES of its eval points: the highest
    (worst) of the seeds' values there (`baseline` is the dense arm's `mean_curve`)."""
    values = baseline["max"]
    if not values:
        return []
    return [values[max(0, math.ceil(share * len(values)) - 1)] for share in TARGET_SHARES]


def summarize(arms: dict[str, dict], lrs: list[float], seeds: list[int],
              best_lr: dict[str, float], finals: dict[tuple[str, float, int], float],
              curves: dict[tuple[str, float, int], list[tuple[int, float]]],
              targets: list[float] | None = None) -> dict:
    """Everything the report says, from plain numbers.

    arms: name -> {"label", "non_embedding_parameters"}; finals: (arm, lr, seed) -> final
    eval bits/byte of finished runs; curves: the same keys -> eval curve. An arm's seeds
    are its finished runs at its best rate."""
    by_seed = {arm: {s: finals[(arm, best_lr[arm], s)] for s in seeds
                     if (arm, best_lr[arm], s) in finals} for arm in arms if arm in best_lr}
    arm_curves = {arm: {s: curves[(arm, best_lr[arm], s)] for s in by_seed[arm]
                        if curves.get((arm, best_lr[arm], s))} for arm in by_seed}
    means = {arm: mean_curve(list(c.values())) for arm, c in arm_curves.items()}
    if targets is None:
        targets = default_targets(means[BASELINE]) if BASELINE in means else []
    paired = paired_differences(by_seed)
    order = [arm for arm in arms if arm in by_seed]  # each arm against the one before it
    step = {arm: paired_differences({"prev": by_seed[prev], arm: by_seed[arm]}, "prev")[arm]
            for prev, arm in zip(order, order[1:])}
    reach = {arm: {t: {s: tokens_to_reach(c, t) for s, c in arm_curves[arm].items()}
                   for t in targets} for arm in arm_curves}
    out = {"baseline": BASELINE, "lrs": lrs, "seeds": seeds, "targets": targets, "arms": {}}
    for arm, info in arms.items():
        sweep = {lr: finals.get((arm, lr, seeds[0])) for lr in lrs}
        swept = [lr for lr, v in sweep.items() if v is not None]  # arms may sweep other rates
        row = {**info, "sweep": sweep, "best_lr": best_lr.get(arm),
               "best_at_edge": arm in best_lr and len(swept) > 1
               and best_lr[arm] in (min(swept), max(swept))}
        if arm in by_seed:
            row["final_bits_per_byte"] = {"per_seed": by_seed[arm],
                                          **mean_sd(list(by_seed[arm].values()))}
            row["paired_vs_baseline"] = paired[arm] if BASELINE in by_seed else None
            row["paired_vs_previous"] = step.get(arm)
            row["curve"] = means[arm]
            row["tokens_to"] = [_reach_row(t, reach[arm][t], reach.get(BASELINE, {}).get(t))
                                for t in targets]
            row["paired_curve"] = _paired_curve(arm_curves[arm], arm_curves.get(BASELINE, {}))
        out["arms"][arm] = row
    return out


def _reach_row(target: float, per_seed: dict[int, float | None],
               base: dict[int, float | None] | None) -> dict:
    reached = [t for t in per_seed.values() if t is not None]
    ratios = [per_seed[s] / base[s] for s in per_seed
              if base and per_seed[s] is not None and base.get(s)]
    return {"target": target, "per_seed": per_seed, "reached": len(reached),
            **mean_sd(reached), "ratio_vs_baseline": mean_sd(ratios)}


def _paired_curve(arm: dict[int, list], base: dict[int, list]) -> dict:
    """Per eval point, mean and sd over seeds of (arm - baseline) bits/byte."""
    pairs = [(arm[s], dict(base[s])) for s in arm if s in base]
    diffs = [{t: v - b[t] for t, v in curve if t in b} for curve, b in pairs]
    common = sorted(set.intersection(*(set(d) for d in diffs))) if diffs else []
    stats = [mean_sd([d[t] for d in diffs]) for t in common]
    return {"tokens": common, "mean": [x["mean"] for x in stats], "sd": [x["sd"] for x in stats]}


# ---- writing ----
def _pm(stats: dict, digits: int = 4, signed: bool = False) -> str:
    """"mean ± sd" ("-" without values; no sd below two)."""
    if not stats or not stats["n"]:
        return "-"
    sd = "" if math.isnan(stats["sd"]) else f" ± {stats['sd']:.{digits}f}"
    return f"{stats['mean']:{'+' if signed else ''}.{digits}f}{sd}"


def _paired(p: dict | None) -> str:
    if not p or not p["n"]:
        return "-"
    return f"{_pm(p, signed=True)} ({', '.join(f'{d:+.4f}' for d in p['diffs'].values())})"


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def report_markdown(summary: dict) -> str:
    arms, lrs = summary["arms"], summary["lrs"]
    lines = [f"## Learning-rate sweep (seed {summary['seeds'][0]}): final eval bits/byte", "",
             "| arm | non-embedding parameters | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + " | best |", "|---|---:|" + "---:|" * len(lrs) + "---|"]
    for r in arms.values():
        cells = ["-" if v is None else f"{v:.4f}" for v in r["sweep"].values()]
        best = "-" if r["best_lr"] is None else f"{r['best_lr']:g}" + (
            " (edge of the sweep)" if r["best_at_edge"] else "")
        lines.append(f"| {r['label']} | {r['non_embedding_parameters']:,} | "
                     + " | ".join(cells) + f" | {best} |")
    lines += ["", "## Final eval bits/byte at each arm's best rate (whole eval file)", "",
              "Differences are paired by seed (same data order and init seed): mean ± sd over "
              "the seeds both arms have; per seed in brackets. Negative = better.", "",
              "| arm | seeds | bits/byte, mean ± sd | minus dense | minus the arm above |",
              "|---|---:|---:|---:|---:|"]
    for r in arms.values():
        if "final_bits_per_byte" not in r:
            continue
        cells = [_paired(r.get(k)) for k in ("paired_vs_baseline", "paired_vs_previous")]
        lines.append(f"| {r['label']} | {r['final_bits_per_byte']['n']} | "
                     f"{_pm(r['final_bits_per_byte'])} | " + " | ".join(cells) + " |")
    if summary["targets"]:
        lines += ["", "## Tokens to reach an eval loss (bits/byte on the curve's eval tokens)",
                  "", "Mean over seeds of each run's interpolated tokens (runs that got there); "
                  "in brackets the mean ± sd of the paired ratio to the dense arm.", "",
                  "| arm | " + " | ".join(f"{t:.4f}" for t in summary["targets"]) + " |",
                  "|---|" + "---:|" * len(summary["targets"])]
        for r in arms.values():
            if "tokens_to" not in r:
                continue
            cells = []
            for c in r["tokens_to"]:
                ratio = c["ratio_vs_baseline"]
                text = "not reached" if not c["reached"] else _tokens(c["mean"])
                if c["reached"] < len(c["per_seed"]):
                    text += f" ({c['reached']}/{len(c['per_seed'])} seeds)"
                if ratio["n"]:
                    text += f" ({_pm(ratio, 3)}x)"
                cells.append(text)
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    edge = [r["label"] for r in arms.values() if r["best_at_edge"]]
    if edge:
        lines += ["", "Best rate at the edge of the sweep (the optimum may lie outside it): "
                  + "; ".join(edge) + "."]
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> Path:
    """Left: each arm's mean eval curve (band: min-max over seeds); right: the paired
    difference to the dense arm (band: ± 1 sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in summary["arms"].values():
        c = r.get("curve")
        if not c or not c["tokens"]:
            continue
        (line,) = left.plot(c["tokens"], c["mean"], label=f"{r['label']} (lr {r['best_lr']:g})")
        left.fill_between(c["tokens"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
        p = r.get("paired_curve")
        if p and p["tokens"]:
            right.plot(p["tokens"], p["mean"], color=line.get_color(), label=r["label"])
            lo = [m - (0 if math.isnan(s) else s) for m, s in zip(p["mean"], p["sd"])]
            hi = [m + (0 if math.isnan(s) else s) for m, s in zip(p["mean"], p["sd"])]
            right.fill_between(p["tokens"], lo, hi, color=line.get_color(), alpha=0.15)
    for t in summary["targets"]:
        left.axhline(t, color="grey", linewidth=0.5, linestyle=":")
    left.set(xlabel="training tokens", ylabel="eval bits/byte (curve tokens)",
             title="eval loss vs tokens (mean; band: min-max over seeds)")
    right.set(xlabel="training tokens", ylabel="arm - dense, bits/byte",
              title="paired difference to dense (mean ± sd)")
    right.axhline(0, color="black", linewidth=0.5)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def write_report(study_dir: Path, manifest: dict) -> Path:
    """report.json, report.md and curves.png in `study_dir` from its finished runs."""
    study_dir = Path(study_dir)
    s = manifest["settings"]
    finals, curves = {}, {}
    for run in manifest["runs"].values():
        final = final_metrics(study_dir / run["out_dir"])
        if final is not None:
            key = (run["arm"], run["lr"], run["seed"])
            finals[key] = final["eval_bits_per_byte"]
            curves[key] = eval_curve(study_dir / run["out_dir"])
    arms = {name: {"label": a["label"], "non_embedding_parameters": a["non_embedding_parameters"]}
            for name, a in manifest["arms"].items()}
    # every rate any arm was swept at: a later invocation may sweep the new arms at other rates
    lrs = sorted(set(s["lrs"]) | {r["lr"] for r in manifest["runs"].values()
                                  if r["phase"] == "sweep" and r["seed"] == s["seeds"][0]})
    summary = summarize(arms, lrs, s["seeds"], manifest.get("best_lr", {}), finals, curves)
    summary["tokens_per_run"] = s["steps"] * s["batch_size"] * s["seq_len"]
    summary["finished_runs"] = len(finals)
    write_atomic(study_dir / "report.json", json.dumps(summary, indent=1))
    plot_curves(summary, study_dir / "curves.png")
    head = (f"# FANformer ablation study: {len(finals)} finished run(s) of "
            f"{summary['tokens_per_run']:,} tokens\n\nCurves: curves.png. Settings and "
            "commands: manifest.json.\n\n")
    write_atomic(study_dir / "report.md", head + report_markdown(summary))
    return study_dir / "report.md"
