"""`fanformer-train`: tokenizer, token cache, AdamW + warmup/cosine, mixed precision, resume, DDP.

    fanformer-train ../shared/data/train.txt --preset tiny --out_dir runs/tiny

Trains the BPE tokenizer when none is given, tokenizes once into a memory-mapped cache
(`data.TokenCache`), then runs the loop: gradient accumulation, bf16 autocast over fp32
master weights, clipping, periodic eval (cross-entropy and bits/byte), metrics as JSON
Lines, a loss-curve PNG, atomic checkpoints every N steps that `--resume` continues exactly.
Ctrl-C / SIGTERM saves a checkpoint first. Under `torchrun` it is data-parallel (DDP):
each rank reads its own slice of every global batch; only rank 0 logs and writes.
Documents are packed with EOS between them and attention is plain causal over the window,
or block-diagonal per document with `--document_mask` (docs/TRAINING.md weighs the two).
Errors are one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from fanformer import distributed as dd
from fanformer.checkpoint import CheckpointError
from fanformer.config import ModelConfig
from fanformer.data import DataError
from fanformer.flags import FlagParser
from fanformer.outputs import write_marker
from fanformer.train_args import ALIASES, RUN_WRITER, TrainArgs, check_args
from fanformer.trainer import Trainer, plot_metrics

__all__ = ["TrainArgs", "build_parser", "main", "parse_args", "run"]


def build_parser() -> FlagParser:
    parser = FlagParser(prog="fanformer-train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainArgs):
        flags = [f"--{f.name}", *ALIASES.get(f.name, [])]
        if f.name == "data":
            parser.add_argument("data", nargs="*", help=f.metadata["help"])
            parser.add_argument("--data", *ALIASES["data"], dest="data_flag", nargs="+",
                                default=[], metavar="PATH", help="the same inputs, as a flag")
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
    overrides = overrides or {}
    args, _ = check_args(args, overrides)  # every argument, before any work
    device = resolve_device(args)
    world = dd.init_world(device.type)
    if world.is_main:
        write_marker(args.out_dir, RUN_WRITER)  # ours from now on: a rerun may continue it
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    trainer = None
    try:
        trainer = Trainer(args, overrides, world, device)
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
