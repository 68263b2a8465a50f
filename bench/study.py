"""The FANformer ablation study: which part of the FANformer helps a dense transformer, if any.

    python bench/study.py --dry_run            # the plan and an estimated time, nothing run
    python bench/study.py                      # run it (hours); rerun the same to continue

Five arms, each adding one switch to the one before, all with the same number of
non-embedding parameters (the FFN width `d_ff` absorbs what a switch adds or removes):
dense pre-norm Llama-style transformer; + FAN attention (`fan_p`: Fourier features feed Q,
K, V, the paper's claim); + CoLA (`cola_rank`); + HybridNorm* (`norm hybrid`); + gated
residuals (= the full FANformer). Procedure: a learning-rate sweep per arm at the first
seed, then the other seeds at each arm's best rate (the sweep's run is reused). Every run
is a `fanformer-train` subprocess in `<out_dir>/runs/<run id>`, with one shared tokenizer,
token cache, eval file and data order per seed. `<out_dir>/manifest.json` records the plan
and what finished; a rerun skips finished runs and continues an interrupted one with
`--resume` (exact, tests/test_train.py). Settings that change what a run means (shape,
steps, data, ...) must not change between invocations; arms, rates and seeds may be added.
At the end of every invocation `study_report.py` writes report.md, report.json and
curves.png from whatever has finished. Knows nothing about the model's internals beyond
ModelConfig's switches; docs/EXPERIMENTS.md explains the method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from study_report import (  # bench/ is on sys.path as a script
    final_metrics,
    read_metrics,
    write_atomic,
    write_report,
)

from fanformer.config import ModelConfig
from fanformer.data import DataError, TokenCache, iter_lines, resolve_files
from fanformer.flags import FlagParser
from fanformer.model import FANformer
from fanformer.outputs import OutputError, check_output_dir, write_marker
from fanformer.tokenizer import Tokenizer
from fanformer.train_args import TrainArgs
from fanformer.trainer import make_optimizer

WRITER = "bench/study.py"
MANIFEST_VERSION = 1
REPO = Path(__file__).resolve().parents[1]
#: arm name -> (label, the switch it turns on, on top of every arm before it)
ARMS: dict[str, tuple[str, str]] = {
    "dense": ("dense transformer (pre-norm, Llama-style)", ""),
    "fan": ("+ FAN attention", "fan_p"),
    "cola": ("+ CoLA", "cola_rank"),
    "hybridnorm": ("+ HybridNorm*", "norm"),
    "gates": ("+ gated residuals (= full FANformer)", "gated_residual"),
}
PARAM_TOLERANCE = 0.01  # each arm's non-embedding parameters within 1% of the dense arm's
D_FF_MULTIPLE = 8
#: settings a finished run depends on: a rerun that changes one would mix two studies
RUN_SETTINGS = ("data", "eval_file", "tokenizer_sha", "d_model", "n_layers", "n_heads",
                "n_kv_heads", "d_ff", "fan_p", "cola_rank", "seq_len", "batch_size", "steps",
                "warmup_steps", "eval_every", "eval_tokens", "precision", "train_flags")


class StudyError(ValueError):
    """A study that cannot go on as asked; one sentence for the user."""


# ---- the plan ----
def non_embedding_parameters(config: ModelConfig) -> int:
    """Parameters outside the (tied) embedding, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = FANformer(config)
    return model.num_parameters() - model.embed.weight.numel()


def arm_configs(shape: dict, arms: list[str]) -> dict[str, ModelConfig]:
    """Each arm's ModelConfig: the switches of every arm up to it on, and `d_ff` chosen (a
    multiple of 8 where one is close enough) so its non-embedding parameters match the
    dense arm's within 1%.

    `shape` holds vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff (the dense
    arm's), max_seq_len, fan_p and cola_rank. Raises StudyError when no d_ff matches."""
    on = {"fan_p": shape["fan_p"], "cola_rank": shape["cola_rank"], "norm": "hybrid",
          "gated_residual": True}
    base = {k: shape[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                  "d_ff", "max_seq_len")}
    switches = {"fan_p": 0.0, "cola_rank": 0, "norm": "pre", "gated_residual": False}
    dense = ModelConfig(**base, **switches, dropout=0.0)
    target = non_embedding_parameters(dense)
    configs = {}
    for name, (_, switch) in ARMS.items():
        if switch:
            switches = {**switches, switch: on[switch]}
        if name not in arms:
            continue
        configs[name] = dense if not switch else _matched(base, switches, target)
    return configs


def _matched(base: dict, switches: dict, target: int) -> ModelConfig:
    """The config with `switches` whose d_ff brings its parameters nearest `target`
    (parameters are linear in d_ff: two counts give the line)."""
    def build(d_ff: int) -> ModelConfig:
        return ModelConfig(**{**base, "d_ff": d_ff}, **switches, dropout=0.0)

    lo, hi = D_FF_MULTIPLE, 2 * D_FF_MULTIPLE
    p_lo, p_hi = non_embedding_parameters(build(lo)), non_embedding_parameters(build(hi))
    exact = max(1, round(lo + (target - p_lo) / ((p_hi - p_lo) / (hi - lo))))
    rounded = max(D_FF_MULTIPLE, round(exact / D_FF_MULTIPLE) * D_FF_MULTIPLE)
    for d_ff in (rounded, exact):  # a multiple of 8 when that is close enough
        config = build(d_ff)
        gap = non_embedding_parameters(config) / target - 1
        if abs(gap) <= PARAM_TOLERANCE:
            break
    else:
        raise StudyError(f"no d_ff matches the dense arm's {target:,} non-embedding parameters "
                         f"within 1% for {switches} (best d_ff {exact}: {gap:+.1%}); change "
                         "--d_model, --d_ff or --cola_rank")
    return config


@dataclass(frozen=True)
class Run:
    arm: str
    lr: float
    seed: int
    phase: str  # "sweep" (first seed, every rate) or "seeds" (other seeds, the best rate)

    @property
    def id(self) -> str:
        return f"{self.arm}_lr{self.lr:g}_s{self.seed}"


def plan_runs(arms: list[str], lrs: list[float], seeds: list[int],
              best_lr: dict[str, float]) -> list[Run]:
    """Every run the study wants now: the sweep at seeds[0], then seeds[1:] for each arm
    whose best rate is known (its sweep has finished). Sweep runs come first."""
    sweep = [Run(arm, lr, seeds[0], "sweep") for arm in arms for lr in lrs]
    more = [Run(arm, best_lr[arm], seed, "seeds") for arm in arms if arm in best_lr
            for seed in seeds[1:]]
    return sweep + more


def best_rates(arms: list[str], lrs: list[float], seed: int,
               runs: dict[str, dict]) -> dict[str, float]:
    """Each arm's rate with the lowest final eval bits/byte at the sweep seed, for arms
    whose sweep over `lrs` has finished (`runs`: the manifest's run entries). Rates that
    earlier invocations finished at that seed count too, so a later `--lrs` that names
    only new rates cannot pick a rate that an earlier one already beat."""
    scores = {(r["arm"], r["lr"]): r["final"]["eval_bits_per_byte"] for r in runs.values()
              if r.get("final") and r["seed"] == seed and r["phase"] == "sweep"}
    best = {}
    for arm in arms:
        if all((arm, lr) in scores for lr in lrs):
            rates = sorted(lr for a, lr in scores if a == arm)
            best[arm] = min(rates, key=lambda lr: (scores[arm, lr] != scores[arm, lr],  # NaN
                                                   scores[arm, lr]))  # last
    return best


# ---- one run ----
def model_flags(config: ModelConfig) -> list[str]:
    """fanformer-train flags that give exactly `config` (its vocab comes from the tokenizer)."""
    flags = ["--preset", "transformer-test"]
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "fan_p",
                "cola_rank", "norm", "gated_residual", "dropout"):
        value = getattr(config, key)
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def run_command(run: Run, config: ModelConfig, s: dict, run_dir: Path,
                stop_at_step: int) -> list[str]:
    """The fanformer-train command line of `run` (with --resume when its folder exists)."""
    cmd = [sys.executable, "-m", "fanformer.train", *s["data"], "--out_dir", str(run_dir),
           *model_flags(config), "--tokenizer", s["tokenizer"], "--eval_file", s["eval_file"],
           "--cache_dir", s["cache_dir"], "--seq_len", str(s["seq_len"]),
           "--batch_size", str(s["batch_size"]), "--max_steps", str(s["steps"]),
           "--warmup_steps", str(s["warmup_steps"]), "--lr", f"{run.lr:g}",
           "--seed", str(run.seed), "--precision", s["precision"], "--device", "cpu",
           "--eval_every", str(s["eval_every"]), "--eval_tokens", str(s["eval_tokens"]),
           "--save_every", str(s["save_every"]), "--keep_last", "1", "--log_every", "10",
           *s["train_flags"]]
    if run_dir.exists():
        cmd.append("--resume")
    if stop_at_step:
        cmd += ["--stop_at_step", str(stop_at_step)]
    return cmd


def steps_done(run_dir: Path) -> int:
    """The last step a run logged (0 when it has not started)."""
    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)


# ---- the study folder ----
class Study:
    """One study folder: settings, manifest, tokenizer, token cache, and its runs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = Path(args.out_dir)
        self.manifest_path = self.dir / "manifest.json"
        check_output_dir(self.dir, WRITER, "--out_dir")
        self.manifest = (json.loads(self.manifest_path.read_text())
                         if self.manifest_path.is_file() else None)

    def settings(self, tokenizer: str, vocab_size: int) -> dict:
        a = self.args
        files = [str(f.resolve()) for f in resolve_files(list(a.data))]
        return {"data": files, "eval_file": str(Path(a.eval_file).resolve()),
                "tokenizer": tokenizer, "tokenizer_sha": _sha(Path(tokenizer)),
                "vocab_size": vocab_size, "cache_dir": str((self.dir / "cache").resolve()),
                "d_model": a.d_model, "n_layers": a.n_layers, "n_heads": a.n_heads,
                "n_kv_heads": a.n_kv_heads, "d_ff": a.d_ff, "fan_p": a.fan_p,
                "cola_rank": a.cola_rank or a.d_model // 4, "seq_len": a.seq_len,
                "batch_size": a.batch_size, "steps": a.steps, "warmup_steps": a.warmup_steps,
                "eval_every": a.eval_every, "eval_tokens": a.eval_tokens,
                "save_every": a.save_every, "precision": a.precision,
                "train_flags": (a.train_flags or "").split(), "arms": a.arms, "lrs": a.lrs,
                "seeds": a.seeds}

    def check_settings(self, settings: dict) -> None:
        if self.manifest is None:
            return
        old = self.manifest["settings"]
        changed = [k for k in RUN_SETTINGS if old.get(k) != settings[k]]
        if changed:
            raise StudyError(f"{self.dir} holds a study with other {', '.join(changed)} "
                             f"({', '.join(f'{k}={old.get(k)}' for k in changed)}); rerun "
                             "with the same settings or choose another --out_dir")

    def tokenizer_path(self) -> Path:
        """--tokenizer, the one an earlier invocation trained, or a new one on the data."""
        if self.args.tokenizer:
            return Path(self.args.tokenizer).resolve()
        path = (self.dir / "tokenizer" / "tokenizer.json").resolve()
        if not path.is_file() and not self.args.dry_run:
            files = resolve_files(list(self.args.data))
            _log(f"training the study's {self.args.vocab_size}-token BPE tokenizer on "
                 f"{len(files)} file(s)")
            tok = Tokenizer.train(iter_lines(files), self.args.vocab_size, show_progress=True)
            write_marker(self.dir, WRITER)  # before the folder's first file, as for a run
            tmp = self.dir / ".tokenizer.tmp"  # a killed save leaves no half tokenizer
            shutil.rmtree(tmp, ignore_errors=True)  # one an earlier killed save left
            tmp.mkdir()
            tok.save(tmp)
            os.replace(tmp, path.parent)
        return path

    def save_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, json.dumps(manifest, indent=1))
        self.manifest = manifest


def _sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- running ----
def refresh(manifest: dict, study_dir: Path) -> None:
    """Take each run's state from its folder (a run that finished while the study was
    killed counts as done; a deleted run folder is run again)."""
    for entry in manifest["runs"].values():
        final = final_metrics(study_dir / entry["out_dir"])
        if final is not None:
            entry.update(status="done", final=final)
        elif entry.pop("final", None) is not None or entry.get("status") == "running":
            entry["status"] = "stopped"


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted


def run_study(study: Study, settings: dict, configs: dict[str, ModelConfig]) -> list[str]:
    """Launch every pending run, up to --jobs at a time, until the plan is done or nothing
    more can start; returns the ids of the runs that failed (non-zero exit)."""
    a = study.args
    runs_dir, logs_dir = study.dir / "runs", study.dir / "logs"
    logs_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    manifest = study.manifest
    refresh(manifest, study.dir)
    running: dict[str, subprocess.Popen] = {}
    unfinished: set[str] = set()  # failed or stopped in this invocation: not retried now
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        while True:
            finals = {rid: r["final"] for rid, r in manifest["runs"].items() if r.get("final")}
            best = best_rates(a.arms, a.lrs, a.seeds[0], manifest["runs"])
            manifest["best_lr"] = {**manifest.get("best_lr", {}), **best}  # others' kept
            pending = [r for r in plan_runs(a.arms, a.lrs, a.seeds, best)
                       if r.id not in finals and r.id not in running and r.id not in unfinished]
            while pending and len(running) < a.jobs:
                run = pending.pop(0)
                run_dir = runs_dir / run.id
                cmd = run_command(run, configs[run.arm], settings, run_dir, a.stop_at_step)
                entry = manifest["runs"].setdefault(run.id, {
                    "arm": run.arm, "lr": run.lr, "seed": run.seed, "phase": run.phase,
                    "out_dir": str(run_dir.relative_to(study.dir)), "attempts": 0})
                entry.update(status="running", command=cmd, attempts=entry["attempts"] + 1)
                _log(f"start {run.id} ({run.phase}, from step {steps_done(run_dir)}): "
                     f"{' '.join(cmd)}")
                with open(logs_dir / f"{run.id}.log", "a") as log:
                    running[run.id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                       env=env)
            study.save_manifest(manifest)
            if not running:
                return [r for r in unfinished if manifest["runs"][r]["status"] == "failed"]
            time.sleep(a.poll_s)
            for rid, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[rid]
                entry = manifest["runs"][rid]
                final = final_metrics(runs_dir / rid)
                if final is not None:
                    entry.update(status="done", final=final)
                    _log(f"done  {rid}: eval {final['eval_bits_per_byte']:.4f} bits/byte")
                else:
                    unfinished.add(rid)
                    entry["status"] = "stopped" if proc.returncode == 0 else "failed"
                    _log(f"{entry['status']} {rid} at step {steps_done(runs_dir / rid)} "
                         f"(exit {proc.returncode}; log {logs_dir / (rid + '.log')})")
    except (KeyboardInterrupt, _Interrupted):
        _log(f"interrupted: stopping {len(running)} run(s) (each saves a checkpoint)")
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for rid, proc in running.items():
            proc.wait()
            manifest["runs"][rid]["status"] = "stopped"
        study.save_manifest(manifest)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the dry run ----
def measure_tokens_per_s(config: ModelConfig, batch: int, seq_len: int, bf16: bool,
                         threads: int, steps: int = 2) -> float:
    """Training tokens/s of `config` on random tokens (one warm-up step, then `steps`):
    only for the dry run's time estimate; bench/bench_train.py is the benchmark."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = FANformer(config).train()
    optimizer = make_optimizer(model, TrainArgs())
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1])  # (B, T, V)
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * seq_len * steps / (time.perf_counter() - start)


def dry_run(study: Study, settings: dict, configs: dict[str, ModelConfig]) -> None:
    """Print the arms, the runs (done / to resume / to run) and an estimated wall time."""
    a, s = study.args, settings
    tokens_per_run = s["steps"] * s["batch_size"] * s["seq_len"]
    runs = {}
    if study.manifest is not None:
        refresh(study.manifest, study.dir)  # in memory only: a dry run writes nothing
        runs = study.manifest["runs"]
    finals = {rid: r["final"] for rid, r in runs.items() if r.get("final")}
    best = best_rates(a.arms, a.lrs, a.seeds[0], runs)
    print(f"study {study.dir}: {len(a.arms)} arms x {len(a.lrs)} rates at seed {a.seeds[0]}, "
          f"then seeds {a.seeds[1:]} at each arm's best rate; {s['steps']} steps x "
          f"{s['batch_size']} x {s['seq_len']} = {tokens_per_run:,} tokens per run")
    print(f"tokenizer {s['tokenizer']} ({s['vocab_size']} tokens"
          f"{'' if Path(s['tokenizer']).is_file() else ', to be trained'}); eval "
          f"{s['eval_file']}; data {' '.join(s['data'])}")
    print(f"load average {os.getloadavg()[0]:.2f}; timing each arm for 2 steps on "
          f"{a.threads or torch.get_num_threads()} thread(s) ...", flush=True)
    print("| arm | d_ff | non-embedding parameters | parameters | tokens/s now |")
    print("|---|---:|---:|---:|---:|")
    speed = {}
    for name, config in configs.items():
        speed[name] = measure_tokens_per_s(config, s["batch_size"], s["seq_len"],
                                           s["precision"] == "bf16", a.threads)
        with torch.device("meta"):
            total = FANformer(config).num_parameters()
        print(f"| {ARMS[name][0]} | {config.d_ff} | {non_embedding_parameters(config):,} | "
              f"{total:,} | {speed[name]:,.0f} |", flush=True)
    runs = plan_runs(a.arms, a.lrs, a.seeds, best)
    unknown = [Run(arm, float("nan"), seed, "seeds") for arm in a.arms if arm not in best
               for seed in a.seeds[1:]]  # their rate is not known yet; their cost is
    seconds, states = 0.0, {"done": 0, "resume": 0, "new": 0}
    n_evals = (s["steps"] - 1) // s["eval_every"] if s["eval_every"] else 0
    eval_tokens = n_evals * s["eval_tokens"] + Path(s["eval_file"]).stat().st_size // 4
    lines = []
    for run in runs + unknown:
        run_dir = study.dir / "runs" / run.id
        if run.id in finals:
            states["done"] += 1
            lines.append(f"{run.id}: done, {finals[run.id]['eval_bits_per_byte']:.4f} bits/byte")
            continue
        done = steps_done(run_dir) if run.lr == run.lr else 0
        states["resume" if done else "new"] += 1
        left = (s["steps"] - done) * s["batch_size"] * s["seq_len"] + eval_tokens / 3
        seconds += left / speed[run.arm]
        name = run.id if run.lr == run.lr else f"{run.arm} seed {run.seed} at its best rate"
        lines.append(f"{name}: " + (f"resume at step {done}" if done else "to start"))
    print("runs (in launch order, sweep first):\n  " + "\n  ".join(lines))
    print(f"runs: {states['done']} done, {states['resume']} to resume, {states['new']} to "
          f"start ({len(unknown)} of them at a rate the sweep will pick)")
    print(f"estimated time left: {seconds / 3600 / a.jobs:.1f} h ({seconds / 60 / a.jobs:.0f} "
          f"min) with {a.jobs} job(s) at the "
          f"tokens/s above (evals counted at 1/3 of a training token; the machine's load "
          f"now is part of the measurement)")


# ---- command line ----
def build_parser() -> FlagParser:
    p = FlagParser(prog="bench/study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="*", default=[str(REPO.parent / "shared/data/train.jsonl")],
                   help="training text (fanformer-train inputs)")
    p.add_argument("--out_dir", default="runs/study", help="the study folder")
    p.add_argument("--eval_file", default=str(REPO / "fanformer/assets/eval.txt"))
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for every run (default: train one on the data, once)")
    p.add_argument("--vocab_size", type=int, default=4096, help="of the trained tokenizer")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 2e-3, 4e-3],
                   help="the learning-rate sweep (at the first seed)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="the first is the sweep's; the others run at each arm's best rate")
    g = p.add_argument_group("model (the dense arm; the others match its parameters)")
    g.add_argument("--d_model", type=int, default=128)
    g.add_argument("--n_layers", type=int, default=4)
    g.add_argument("--n_heads", type=int, default=4)
    g.add_argument("--n_kv_heads", type=int, default=2)
    g.add_argument("--d_ff", type=int, default=384, help="the dense arm's SwiGLU width")
    g.add_argument("--fan_p", type=float, default=0.15, help="FAN periodic share (FAN arms)")
    g.add_argument("--cola_rank", type=int, default=0, help="CoLA rank (0: d_model / 4)")
    g = p.add_argument_group("training (every run)")
    g.add_argument("--seq_len", type=int, default=256)
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--steps", type=int, default=1280, help="optimizer steps per run")
    g.add_argument("--warmup_steps", type=int, default=100)
    g.add_argument("--eval_every", type=int, default=64, help="steps between curve points")
    g.add_argument("--eval_tokens", type=int, default=65536, help="tokens per curve point")
    g.add_argument("--save_every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    g.add_argument("--train_flags", default=None,
                   help="more fanformer-train flags for every run, given with '=': "
                        "--train_flags=--document_mask")
    g = p.add_argument_group("this invocation")
    g.add_argument("--jobs", type=int, default=2, help="runs at a time")
    g.add_argument("--threads", type=int, default=1, help="OMP threads per run (0: torch's)")
    g.add_argument("--stop_at_step", type=int, default=0,
                   help="stop every run launched now at this step (a later rerun continues)")
    g.add_argument("--dry_run", action="store_true", help="print the plan and a time estimate")
    g.add_argument("--report_only", action="store_true", help="only rewrite the report")
    g.add_argument("--poll_s", type=float, default=2.0, help=argparse.SUPPRESS)
    return p


def check_args(a: argparse.Namespace) -> None:
    problems = [f"--{k} must be positive, got {getattr(a, k)}" for k in (
        "steps", "batch_size", "seq_len", "jobs", "save_every", "eval_tokens", "vocab_size")
        if getattr(a, k) <= 0]
    problems += [f"--{k} must be >= 0, got {getattr(a, k)}" for k in (
        "threads", "stop_at_step", "eval_every", "warmup_steps") if getattr(a, k) < 0]
    if len(set(a.lrs)) != len(a.lrs) or any(lr <= 0 for lr in a.lrs):
        problems.append(f"--lrs must be distinct and positive, got {a.lrs}")
    if len(set(a.seeds)) != len(a.seeds):
        problems.append(f"--seeds must be distinct, got {a.seeds}")
    if a.tokenizer and not Path(a.tokenizer).is_file():
        problems.append(f"--tokenizer {a.tokenizer} is not a file (give a tokenizer.json)")
    if problems:
        raise StudyError("; ".join(problems))
    a.arms = [arm for arm in ARMS if arm in a.arms]  # the cumulative order, once each


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        study = Study(args)
        if args.report_only:
            if study.manifest is None:
                raise StudyError(f"{study.dir} holds no study (no manifest.json)")
            _log(f"report: {write_report(study.dir, study.manifest)}")
            return 0
        tokenizer = study.tokenizer_path()
        tok = Tokenizer.load(tokenizer) if tokenizer.is_file() else None  # None: dry run only
        vocab = args.vocab_size if tok is None else tok.vocab_size
        settings = study.settings(str(tokenizer), vocab)
        study.check_settings(settings)
        shape = {**{k: settings[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                             "d_ff", "fan_p", "cola_rank")},
                 "vocab_size": vocab, "max_seq_len": args.seq_len}
        configs = arm_configs(shape, args.arms)
        if args.dry_run:
            dry_run(study, settings, configs)
            return 0
        write_marker(study.dir, WRITER)
        for name, files in (("train", settings["data"]), ("eval", [settings["eval_file"]])):
            TokenCache.build([Path(f) for f in files], tok,
                             settings["cache_dir"], name)  # once, before parallel runs
        manifest = study.manifest or {"version": MANIFEST_VERSION, "runs": {}}
        manifest["settings"] = settings
        # arms of earlier invocations stay in the report; the cumulative order, once each
        arms = {**manifest.get("arms", {}),
                **{name: {"label": ARMS[name][0], "model": c.to_dict(),
                          "non_embedding_parameters": non_embedding_parameters(c)}
                   for name, c in configs.items()}}
        manifest["arms"] = {name: arms[name] for name in ARMS if name in arms}
        study.save_manifest(manifest)
        failed = run_study(study, settings, configs)
        _log(f"report: {write_report(study.dir, study.manifest)}")
        unfinished = [rid for rid, r in study.manifest["runs"].items() if r["status"] != "done"]
        planned = {r.id for r in plan_runs(args.arms, args.lrs, args.seeds,
                                           study.manifest.get("best_lr", {}))}
        left = [rid for rid in unfinished if rid in planned]
        other = [rid for rid in unfinished if rid not in planned]  # e.g. a rate since dropped
        if left:
            _log(f"{len(left)} run(s) not finished ({', '.join(left)}); rerun the same "
                 "command to continue")
        if other:
            _log(f"{len(other)} earlier run(s) outside this command's --arms / --lrs / --seeds "
                 f"left unfinished: {', '.join(other)}")
        return 1 if failed else 0
    except (StudyError, OutputError, DataError, ValueError) as e:
        print(f"bench/study.py: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Interrupted):
        print("bench/study.py: interrupted; rerun the same command to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
