"""What a training run is asked to do (`TrainArgs`), and the checks made before any work.

`TrainArgs` is everything about a run except the model's shape (that is `ModelConfig`);
each field's help text is also `--help`. `check_args` validates every argument, the model
shape, the inputs and the output folders before a tokenizer is trained or a token cached,
and resolves what depends on the preset (`--seq_len` 0 = the model's context), so a bad
value costs the user one line and no waiting. The trainer (fanformer/trainer.py) and the
command line (fanformer/train.py) both import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fanformer.checkpoint import is_quantized, read_config
from fanformer.config import PRESETS, ModelConfig
from fanformer.data import DataError, resolve_files
from fanformer.outputs import check_not_inside, check_output_dir

DEFAULT_PRESET = "tiny"
RUN_WRITER, EXPORT_WRITER = "fanformer-train", "fanformer-train --export_dir"


@dataclass(frozen=True)
class TrainArgs:
    """Everything about a run except the model's shape (that is `ModelConfig`)."""

    @property
    def model_preset(self) -> str:
        """--preset, or the default one where none was given (None tells "not given" apart,
        so that --init_from can refuse it rather than ignore it)."""
        return self.preset or DEFAULT_PRESET

    data: tuple[str, ...] = field(default=(), metadata={
        "help": "training text: .txt files, folders of them, or .jsonl with a 'text' field"})
    out_dir: str = field(default="runs/fanformer", metadata={
        "help": "run folder (tokenizer, token cache, checkpoints/, metrics.jsonl, loss.png): "
                "absent, empty, or an earlier fanformer-train run"})
    preset: str | None = field(default=None, metadata={
        "help": f"model preset: {', '.join(PRESETS)} (default {DEFAULT_PRESET}; not with "
                "--init_from)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer.json (or a folder holding one); default: train one (--vocab_size)"})
    eval_file: str | None = field(default=None, metadata={
        "help": "evaluation text; default: hold out --eval_fraction of the training tokens"})
    eval_fraction: float = field(default=0.005, metadata={"help": "held-out share"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "token cache folder (default: <out_dir>/cache)"})
    seq_len: int = field(default=0, metadata={
        "help": "training window in tokens (0: the model's context, max_seq_len)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=0, metadata={
        "help": "optimizer steps (0: derived from --epochs)"})
    epochs: float = field(default=1.0, metadata={
        "help": "passes over the training tokens when --max_steps is 0"})
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
    document_mask: bool = field(default=False, metadata={
        "help": "attention does not cross documents inside a packed window and positions "
                "restart after each EOS (slower: no fused causal kernel; docs/TRAINING.md)"})
    seed: int = field(default=0, metadata={"help": "init, data order and dropout seed"})
    eval_every: int = field(default=200, metadata={"help": "steps between evals (0: end only)"})
    eval_tokens: int = field(default=65536, metadata={
        "help": "tokens scored by periodic evals (the final eval scores all)"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept (0: all)"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics lines"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest complete checkpoint in <out_dir>/checkpoints (a "
                "damaged newest one is skipped, with a warning)"})
    resume_from: str | None = field(default=None, metadata={
        "help": "continue from this checkpoint folder (<out_dir>/checkpoints/step_N)"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from this plain model checkpoint's weights (an export, the demo, a "
                "step_N folder) with a fresh optimizer and schedule: continued pre-training "
                "or fine-tuning; its config and tokenizer are used (no --preset, --tokenizer "
                "or model flags but --dropout)"})
    stop_at_step: int = field(default=0, metadata={
        "help": "save and stop after this step, keeping the --max_steps schedule"})
    max_minutes: float = field(default=0.0, metadata={
        "help": "save and stop after this much wall time (0: no limit)"})
    export_dir: str | None = field(default=None, metadata={
        "help": "at the end, also write a model-only bf16 checkpoint here (for serving); "
                "absent, empty or an earlier export, and outside --out_dir"})
    overwrite: bool = field(default=False, metadata={
        "help": "use --out_dir / --export_dir even if they hold files fanformer-train did "
                "not write (files with its names are replaced; an export folder is replaced "
                "whole)"})
    plot: str | None = field(default=None, metadata={
        "help": "only draw <RUN_DIR>/loss.png from its metrics.jsonl, then exit"})


#: Other spellings of our flags: HF transformers' Trainer / run_clm.py names where the
#: meaning is the same, and older names of ours.
ALIASES = {
    "data": ["--train_file"], "eval_file": ["--validation_file"],
    "tokenizer": ["--tokenizer_name"], "out_dir": ["--output_dir"],
    "seq_len": ["--block_size"], "batch_size": ["--per_device_train_batch_size"],
    "grad_accum": ["--gradient_accumulation_steps"], "epochs": ["--num_train_epochs",
                                                                "--epochs_text"],
    "lr": ["--learning_rate"], "beta1": ["--adam_beta1"], "beta2": ["--adam_beta2"],
    "grad_clip": ["--max_grad_norm"], "eval_every": ["--eval_steps"],
    "save_every": ["--save_steps"], "keep_last": ["--save_total_limit"],
    "log_every": ["--logging_steps"], "resume_from": ["--resume_from_checkpoint"],
    "overwrite": ["--overwrite_output_dir"], "fan_p": ["--p"],
}


def check_args(args: TrainArgs, overrides: dict[str, Any]) -> tuple[TrainArgs, ModelConfig]:
    """Every check that needs no tokenizer and no data pass; returns the args with the
    preset-dependent values filled in, and the model config (before the tokenizer's
    vocabulary size is known). Raises ValueError/DataError with one sentence."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for name in ("batch_size", "grad_accum", "save_every", "log_every", "eval_tokens"):
        need(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("seq_len", "max_steps", "warmup_steps", "eval_every", "keep_last",
                 "stop_at_step", "max_minutes", "grad_clip", "weight_decay"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}")
    need(args.epochs > 0, f"--epochs must be positive, got {args.epochs}")
    need(0 <= args.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1], got "
                                      f"{args.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got "
                                           f"{getattr(args, name)}")
    need(args.eval_file is not None or 0 < args.eval_fraction < 1,
         f"--eval_fraction must be in (0, 1), got {args.eval_fraction}")
    need(args.precision in ("auto", "bf16", "fp32"),
         f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    need(args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:"),
         f"--device must be cpu, cuda or auto, got {args.device!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if args.init_from and args.export_dir:
        source, export = Path(args.init_from).resolve(), Path(args.export_dir).resolve()
        if source == export or export in source.parents or source in export.parents:
            where = ("is" if source == export else "holds" if export in source.parents
                     else "lies inside")
            raise ValueError(f"--export_dir {args.export_dir} {where} the --init_from "
                             "checkpoint; the export would replace the model this run "
                             "starts from: choose a separate folder")
    config = start_config(args, overrides)  # bad shapes and bad --init_from fail here
    seq_len = args.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ValueError(f"--seq_len {seq_len} is above the model's context (max_seq_len "
                         f"{config.max_seq_len}); lower it or raise --max_seq_len")
    if not args.data:
        raise DataError("no training input given (pass text files, folders or .jsonl)")
    resolve_files(list(args.data))  # missing or empty inputs fail here
    if args.eval_file:
        resolve_files([args.eval_file])
    if args.tokenizer:
        path = Path(args.tokenizer)
        if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
            raise DataError(f"--tokenizer {path} does not exist")
    if args.resume_from and not (Path(args.resume_from) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from {args.resume_from} is not a training checkpoint "
                         "(no trainer_state.json); pass a <out_dir>/checkpoints/step_N folder")
    check_output_dir(args.out_dir, RUN_WRITER, "--out_dir", args.overwrite)
    if args.export_dir:
        check_not_inside(args.export_dir, args.out_dir, "--export_dir", "--out_dir")
        check_output_dir(args.export_dir, EXPORT_WRITER, "--export_dir", args.overwrite,
                         whole=True)
    return dataclasses.replace(args, seq_len=seq_len), config


#: Model fields that change training only, not the weights or what they compute in eval
#: mode: these may be set on top of an --init_from checkpoint's config.
TRAINING_ONLY_FIELDS = ("dropout",)


def start_config(args: TrainArgs, overrides: dict[str, Any],
                 vocab_size: int | None = None) -> ModelConfig:
    """The model's shape: --init_from's config (with --dropout on top if given), else
    --preset with the model flags on top and, once the tokenizer is known, its
    `vocab_size`. Raises ValueError or CheckpointError with one sentence."""
    if not args.init_from:
        vocab = {"vocab_size": vocab_size} if vocab_size else {}
        return ModelConfig.from_preset(args.model_preset, **{**overrides, **vocab})
    given = [f"--{name}" for name in overrides if name not in TRAINING_ONLY_FIELDS] + (
        ["--tokenizer"] if args.tokenizer else []) + (["--preset"] if args.preset else [])
    if given:
        raise ValueError(f"--init_from takes the model's shape and tokenizer from "
                         f"{args.init_from}; drop {', '.join(given)}")
    if is_quantized(args.init_from):
        raise ValueError(f"--init_from {args.init_from} is a quantized checkpoint; training "
                         "needs the plain checkpoint it was quantized from")
    return dataclasses.replace(read_config(args.init_from), **overrides)
