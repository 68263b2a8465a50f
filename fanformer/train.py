"""`fanformer-train`: tokenizer, token cache, AdamW + warmup/cosine, mixed precision, resume, DDP.

    fanformer-train ../shared/data/train.txt --preset tiny --out_dir runs/tiny

Trains the BPE tokenizer when none is given, tokenizes once into a memory-mapped cache
(`data.TokenCache`), then runs the loop: gradient accumulation, bf16 autocast over fp32
master weights, clipping, periodic eval (cross-entropy and bits/byte), metrics as JSON
Lines, a loss-curve PNG, atomic checkpoints every N steps that `--resume` continues exactly.
Ctrl-C / SIGTERM saves a checkpoint first. Under `torchrun` it is data-parallel (DDP):
each rank reads its own slice of every global batch; only rank 0 logs and writes.
Documents are packed with EOS between them and attention is plain causal over the window
(no block-diagonal mask): see docs/TRAINING.md for why. Errors are one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fanformer import distributed as dd
from fanformer.checkpoint import CheckpointError
from fanformer.config import PRESETS, ModelConfig
from fanformer.data import DataError
from fanformer.trainer import Trainer, plot_metrics


@dataclass(frozen=True)
class TrainArgs:
    """Everything about a run except the model's shape (that is `ModelConfig`)."""

    data: tuple[str, ...] = field(default=(), metadata={
        "help": "training text: .txt files, folders of them, or .jsonl with a 'text' field"})
    out_dir: str = field(default="runs/fanformer", metadata={
        "help": "run directory: tokenizer, token cache, checkpoints/, metrics.jsonl, loss.png"})
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer.json (or a folder holding one); default: train one (--vocab_size)"})
    eval_file: str | None = field(default=None, metadata={
        "help": "evaluation text; default: hold out --eval_fraction of the training tokens"})
    eval_fraction: float = field(default=0.005, metadata={"help": "held-out share"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "token cache folder (default: <out_dir>/cache)"})
    seq_len: int = field(default=256, metadata={"help": "training window in tokens"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=0, metadata={
        "help": "optimizer steps (0: derived from --epochs)"})
    epochs: float = field(default=1.0, metadata={
        "help": "passes over the training tokens when --max_steps is 0 (alias --epochs_text)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr = lr * this"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={
        "help": "AdamW decay on matrices (never on norms, gates, biases, embeddings)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    precision: str = field(default="auto", metadata={
        "help": "bf16 (autocast, fp32 master weights), fp32, or auto (bf16 on CUDA)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in backward (less memory, ~30%% slower)"})
    seed: int = field(default=0, metadata={"help": "init, data order and dropout seed"})
    eval_every: int = field(default=200, metadata={"help": "steps between evals (0: end only)"})
    eval_tokens: int = field(default=65536, metadata={
        "help": "tokens scored by periodic evals (the final eval scores all)"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics lines"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest checkpoint in <out_dir>/checkpoints"})
    stop_at_step: int = field(default=0, metadata={
        "help": "save and stop after this step, keeping the --max_steps schedule"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "save and stop after this much wall time (0: no limit)"})
    export_dir: str | None = field(default=None, metadata={
        "help": "at the end, also write a model-only bf16 checkpoint here (for serving)"})
    plot: str | None = field(default=None, metadata={
        "help": "only draw <RUN_DIR>/loss.png from its metrics.jsonl, then exit"})


ALIASES = {"epochs": ["--epochs_text"], "fan_p": ["--p"], "out_dir": ["--output_dir"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanformer-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainArgs):
        flags = [f"--{f.name}", *ALIASES.get(f.name, [])]
        if f.name == "data":
            parser.add_argument("data", nargs="*", help=f.metadata["help"])
            parser.add_argument("--data", dest="data_flag", nargs="+", default=[],
                                metavar="PATH", help="the same inputs, as a flag")
        elif f.type == "bool":
            parser.add_argument(*flags, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=f.default,
                                help=f.metadata["help"])
    group = parser.add_argument_group("model overrides (on top of --preset)")
    for f in dataclasses.fields(ModelConfig):
        kind = {int: int, float: float, bool: _bool}.get(type(f.default), str)
        group.add_argument(f"--{f.name}", *ALIASES.get(f.name, []), dest=f"model_{f.name}",
                           type=kind, default=None, help=f.metadata["help"])
    return parser


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def run(args: TrainArgs, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run (one rank of it under torchrun); returns its summary."""
    if not args.data:
        raise DataError("no training input given (pass text files, folders or .jsonl)")
    if args.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    for name in ("seq_len", "batch_size", "grad_accum", "save_every", "log_every"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    device = resolve_device(args)
    world = dd.init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    trainer = None
    try:
        trainer = Trainer(args, overrides or {}, world, device)
        summary = trainer.train()
    except BaseException:
        dd.shutdown(world, clean=False)
        raise
    # Free DDP (and the gloo work it holds) before the process group goes: destroying them
    # in the other order could abort the process at exit ("terminate called ...").
    del trainer
    gc.collect()
    dd.shutdown(world, clean=True)
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, dict[str, Any]]:
    """Command line -> (TrainArgs, model-config overrides)."""
    ns = build_parser().parse_args(argv)
    overrides = {k[6:]: v for k, v in vars(ns).items() if k.startswith("model_") and v is not None}
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)}
    data = tuple(values["data"]) + tuple(ns.data_flag)
    return TrainArgs(**{**values, "data": data}), overrides


def resolve_device(args: TrainArgs) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(args.device)


def main(argv: list[str] | None = None) -> int:
    # autocast feeds bf16 activations to fp32 RMSNorm gains: correct, but torch warns each call
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    args, overrides = parse_args(argv)
    try:
        if args.plot:
            print(plot_metrics(Path(args.plot)))
            return 0
        summary = run(args, overrides)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"fanformer-train: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("fanformer-train: error: the batch does not fit in memory; lower --batch_size "
              "(raise --grad_accum to keep the global batch) or use --activation_checkpointing",
              file=sys.stderr)
        return 2
    return 130 if summary["stopped"] == "signal" else 0


if __name__ == "__main__":
    sys.exit(main())
