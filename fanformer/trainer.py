"""The training loop behind `fanformer-train`: set up a run, train it, evaluate, checkpoint.

`Trainer` owns one rank's view of one run: the tokenizer (trained here when none is
given), the memory-mapped token caches, the model, AdamW with warmup + cosine decay, and
the loop (gradient accumulation, bf16 autocast over fp32 master weights, clipping,
periodic eval, metrics JSON Lines, checkpoints). Resume restores model, optimizer, step
(which fixes both the LR and the data position) and every rank's RNG. Under torchrun the
model is wrapped in DDP and each rank reads its slice of every global batch; only rank 0
writes. Documents are packed with EOS between them; attention is plain causal over the
window, or with `--document_mask` block-diagonal per document with positions restarting
after each EOS (docs/TRAINING.md weighs the two). The CLI lives in `train.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fanformer import distributed as dd
from fanformer import trainer_state as ts
from fanformer.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_checkpoint,
    load_tokenizer,
    read_config,
    read_json,
    save_checkpoint,
)
from fanformer.config import ModelConfig
from fanformer.data import (
    DataError,
    PackedBatches,
    TokenCache,
    document_positions,
    evaluate_tokens,
    iter_lines,
    resolve_files,
    split_tokens,
    token_byte_lengths,
)
from fanformer.model import FANformer
from fanformer.outputs import MARKER, marker_text
from fanformer.tokenizer import Tokenizer
from fanformer.train_args import EXPORT_WRITER, TrainArgs, start_config

# Arguments a resumed run must share with the run it continues (else the data order, or
# what the model sees of it, differs).
RESUME_MUST_MATCH = ("seq_len", "batch_size", "grad_accum", "world_size", "seed",
                     "document_mask")
# What checkpoints written before an argument existed were trained with.
RESUME_DEFAULTS = {"document_mask": False}


def lr_at(step: int, args: TrainArgs, max_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: FANformer, args: TrainArgs) -> torch.optim.AdamW:
    """Decay only matrices; norms, gates and biases (1-D) and the embedding are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied head is the embedding: listed once
        (no_decay if p.ndim < 2 or name.startswith("embed") else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))


def enable_activation_checkpointing(model: FANformer) -> None:
    """Recompute each block in backward; each block's forward is bound now, not looked up late."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        def forward(*inputs, _run=block.forward):
            return checkpoint(_run, *inputs, use_reentrant=False)
        block.forward = forward


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint and exits after the current step."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.raised = True

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """Append-only JSON Lines (rank 0 only), one flushed line per record; after a resume
    a step can appear twice, and the later line is the one that counts."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")


def plot_metrics(run_dir: Path) -> Path:
    """Draw train loss and eval cross-entropy against tokens seen into <run_dir>/loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: nothing to plot")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # after a resume a step can be logged twice; the later line wins
    train = sorted({r["tokens"]: r["loss"] for r in rows if "loss" in r}.items())
    evals = sorted({r["tokens"]: r["eval_cross_entropy"] for r in rows
                    if "eval_cross_entropy" in r and not r.get("final")}.items())
    finals = sorted({r["tokens"]: r["eval_cross_entropy"] for r in rows if r.get("final")}.items())
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval cross-entropy (first --eval_tokens)")
    if finals:
        ax.plot(*zip(*finals), "*", markersize=12, label="final eval (all eval tokens)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("nats / token")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"


def summarize(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items())


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Trainer:
    """One rank of one run. `Trainer(args, overrides, world, device).train()`."""

    def __init__(self, args: TrainArgs, overrides: dict[str, Any], world: dd.World,
                 device: torch.device):
        self.args, self.world, self.device = args, world, device
        self.out_dir = Path(args.out_dir)
        files = resolve_files(list(args.data))
        if world.is_main:
            for leftover in ts.remove_incomplete(self.out_dir):
                _log(f"removed {leftover.name}: left by an interrupted checkpoint save")
        dd.barrier(world)
        newest = ts.latest_checkpoint(self.out_dir)
        if newest is not None and not (args.resume or args.resume_from):
            raise CheckpointError(f"{self.out_dir} already holds checkpoints; pass --resume to "
                                  "continue that run, or choose another --out_dir")
        self.resume_dir = self._resume_dir()
        self.tokenizer = self._tokenizer(files, overrides.get("vocab_size"))
        self.config = start_config(args, overrides, self.tokenizer.vocab_size)
        if self.resume_dir is not None:
            saved = read_config(self.resume_dir)
            if saved != self.config:
                diff = [k for k, v in self.config.to_dict().items() if saved.to_dict()[k] != v]
                raise CheckpointError(
                    f"{self.resume_dir} was trained with a different model config (differs in "
                    f"{', '.join(diff)}); pass the same --preset and model flags (or "
                    "--init_from)")
        self._data(files)
        self._model()

    # ---- setup ----
    def _resume_dir(self) -> Path | None:
        """--resume_from's folder; or with --resume the newest checkpoint that reads back
        whole (a damaged newer one is skipped with a warning); else None."""
        if self.args.resume_from:
            ts.check_training_checkpoint(Path(self.args.resume_from))
            return Path(self.args.resume_from)
        if not self.args.resume:
            return None
        for candidate in reversed(ts.list_checkpoints(self.out_dir)):
            try:
                ts.check_training_checkpoint(candidate)
                return candidate
            except CheckpointError as e:
                if self.world.is_main:
                    _log(f"warning: skipping a damaged checkpoint: {e}")
        if self.world.is_main:
            _log(f"no complete checkpoint in {self.out_dir / 'checkpoints'}: starting from "
                 "scratch")
        return None

    def _tokenizer(self, files: list[Path], vocab_size: int | None) -> Tokenizer:
        """The checkpoint's tokenizer on resume, else --init_from's, else --tokenizer, else
        train one (rank 0)."""
        if self.resume_dir is not None:
            return Tokenizer.load(self.resume_dir)
        if self.args.init_from:
            return load_tokenizer(self.args.init_from)
        if self.args.tokenizer:  # train_args.check_args checked that it exists
            return Tokenizer.load(self.args.tokenizer)
        path = self.out_dir / "tokenizer.json"
        if self.world.is_main and not path.is_file():
            size = vocab_size or ModelConfig.from_preset(self.args.model_preset).vocab_size
            _log(f"training a {size}-token BPE tokenizer on {len(files)} file(s)")
            tokenizer = Tokenizer.train(iter_lines(files), size, show_progress=True)
            if tokenizer.vocab_size < size:
                _log(f"warning: the trained tokenizer has {tokenizer.vocab_size} tokens, fewer "
                     f"than the {size} asked for (the text holds no more merges); the model's "
                     f"vocab_size follows the tokenizer")
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(path.parent)
        dd.barrier(self.world)
        return Tokenizer.load(path)

    def _data(self, files: list[Path]) -> None:
        """Tokenize once: rank 0 builds (or finds) the caches, the other ranks map rank 0's
        files (finding them themselves would hash the whole corpus once per rank)."""
        args, world = self.args, self.world
        cache_dir = Path(args.cache_dir or self.out_dir / "cache")
        eval_files = resolve_files([args.eval_file]) if args.eval_file else []
        caches: dict[str, TokenCache] = {}
        if world.is_main:
            caches["train"] = TokenCache.build(files, self.tokenizer, cache_dir, "train")
            if eval_files:
                caches["eval"] = TokenCache.build(eval_files, self.tokenizer, cache_dir, "eval")
        paths = dd.gather_objects(world, {name: c.path for name, c in caches.items()})[0]
        if not world.is_main:
            caches = {name: TokenCache(path) for name, path in paths.items()}
        if eval_files:
            train_tokens, self.eval_tokens = caches["train"].tokens, caches["eval"].tokens
        else:
            train_tokens, self.eval_tokens = split_tokens(caches["train"].tokens,
                                                          args.eval_fraction)
        if len(self.eval_tokens) < 2:
            raise DataError("the evaluation split is empty: raise --eval_fraction or pass "
                            "--eval_file")
        self.batches = PackedBatches(train_tokens, args.seq_len, args.seed)
        self.global_batch = args.batch_size * args.grad_accum * world.size
        if self.batches.n_windows < self.global_batch:
            raise DataError(
                f"the batch does not fit the data: one step needs {self.global_batch} windows "
                f"of {args.seq_len} tokens but the training data holds "
                f"{self.batches.n_windows}; lower --batch_size, --grad_accum or --seq_len")
        self.max_steps = args.max_steps or max(
            1, int(args.epochs * self.batches.n_windows / self.global_batch))
        if args.warmup_steps >= self.max_steps and world.is_main:
            _log(f"warning: --warmup_steps {args.warmup_steps} >= the run's {self.max_steps} "
                 "steps: the learning rate never reaches --lr and never decays")
        self.byte_lengths = token_byte_lengths(self.tokenizer)

    def _model(self) -> None:
        args, world, device = self.args, self.world, self.device
        torch.manual_seed(args.seed)
        self.model = FANformer(self.config).to(device).train()
        if args.init_from and self.resume_dir is None:  # a resume has these weights' heirs
            source = load_checkpoint(args.init_from, device, torch.float32)[0]
            self.model.load_state_dict(source.state_dict())  # self.config may add dropout
        self.optimizer = make_optimizer(self.model, args)
        self.run_args = {**dataclasses.asdict(args), "world_size": world.size,
                         "max_steps": self.max_steps}
        self.step = 0
        if self.resume_dir is not None:
            state = ts.load_training_checkpoint(self.resume_dir, self.model, self.optimizer,
                                                world.rank)
            saved_args = {**RESUME_DEFAULTS, **state["args"]}
            changed = [k for k in RESUME_MUST_MATCH if saved_args[k] != self.run_args[k]]
            if changed:
                raise CheckpointError(
                    f"{self.resume_dir} was trained with different "
                    f"{', '.join('--' + k for k in changed)}; a resume needs the same")
            self.step = state["step"]
        else:
            torch.manual_seed(args.seed + 1 + world.rank)  # dropout masks differ per rank
        self.use_bf16 = args.precision == "bf16" or (
            args.precision == "auto" and device.type == "cuda")
        if args.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.runner = torch.compile(self.model) if args.compile else self.model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.runner = DDP(self.runner,
                              device_ids=[device.index] if device.type == "cuda" else None)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", world.is_main)

    # ---- pieces of the loop ----
    def tokens_at(self, step: int) -> int:
        return step * self.global_batch * self.args.seq_len

    def source_tokens(self) -> int:
        """Tokens the --init_from model was trained on (its export metadata; else 0), so an
        export counts every token behind its weights."""
        if not self.args.init_from:
            return 0
        metadata = read_json(self.args.init_from, CONFIG_FILE).get("metadata") or {}
        return int(metadata.get("trained_tokens", 0))

    def evaluate(self, max_tokens: int | None) -> dict[str, Any]:
        return evaluate_tokens(self.model, self.eval_tokens, self.byte_lengths,
                               self.args.seq_len, max_tokens=max_tokens,
                               autocast_dtype=torch.bfloat16 if self.use_bf16 else None,
                               eos_id=self.tokenizer.eos_id if self.args.document_mask
                               else None)

    def save(self) -> None:
        """Checkpoint the current step (every rank takes part: its RNG state is gathered)."""
        world = self.world
        if world.distributed:  # DDP keeps replicas equal; check it rather than trust it
            sums = dd.gather_objects(world, sum(float(p.double().sum())
                                                for p in self.model.parameters()))
            if len(set(sums)) != 1:
                raise RuntimeError(f"data-parallel ranks diverged at step {self.step}: {sums}")
        rng_tensors, py_rng = ts.capture_rng()
        all_rng = dd.gather_tensors(world, rng_tensors, self.device)
        all_py = dd.gather_objects(world, py_rng)
        if world.is_main:
            state = {"args": self.run_args, "samples_seen": self.step * self.global_batch,
                     "tokens_seen": self.tokens_at(self.step), "python_rng": all_py}
            ts.save_training_checkpoint(self.out_dir, self.step, self.model, self.tokenizer,
                                        self.optimizer, state, all_rng, self.args.keep_last)
        dd.barrier(world)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches -> (mean loss, lr, grad norm)."""
        args, world = self.args, self.world
        lr = lr_at(self.step, args, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            inputs, targets = self.batches.rank_batch(self.step, micro, world.rank,
                                                      args.batch_size, args.grad_accum,
                                                      world.size)
            inputs, targets = inputs.to(self.device), targets.to(self.device)  # (B, T)
            positions = (document_positions(inputs, self.tokenizer.eos_id)  # (B, T)
                         if args.document_mask else None)
            last = micro == args.grad_accum - 1
            sync = self.runner.no_sync() if world.distributed and not last else nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.use_bf16):
                    logits = self.runner(inputs, positions)  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
                (loss / args.grad_accum).backward()
            loss_sum += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return dd.mean(world, loss_sum / args.grad_accum, self.device), lr, float(norm)

    # ---- the loop ----
    def train(self) -> dict[str, Any]:
        """Train to --max_steps (or --stop_at_step, a signal, --max_minutes); return a summary."""
        args, world = self.args, self.world
        if world.is_main:
            source = f"from {args.init_from}" if args.init_from else args.model_preset
            _log(f"model {source}: {self.model.num_parameters():,} parameters; "
                 f"{self.batches.n_windows * args.seq_len:,} training tokens, "
                 f"{len(self.eval_tokens):,} eval tokens; global batch {self.global_batch} x "
                 f"{args.seq_len} tokens; {self.max_steps} steps from step {self.step}; "
                 f"{self.device}, world {world.size}, {'bf16' if self.use_bf16 else 'fp32'}")
            self.metrics.write({"event": "start", "step": self.step,
                                "parameters": self.model.num_parameters(),
                                "args": self.run_args, "model": self.config.to_dict()})
        stop = StopFlag()
        try:
            stopped = self._loop(stop)
        finally:
            stop.close()
        if stopped == "signal" and world.is_main:
            _log("checkpoint saved; continue with the same command plus --resume")
        summary: dict[str, Any] = {"step": self.step, "stopped": stopped,
                                   "tokens": self.tokens_at(self.step)}
        if world.is_main and not stopped:
            summary.update(self._finish())
        return summary

    def _loop(self, stop: StopFlag) -> str:
        """Run steps; return why it stopped early ("signal", "time", "stop_at_step") or ""."""
        args, world = self.args, self.world
        started = time.monotonic()
        stop_at = min(self.max_steps, args.stop_at_step or self.max_steps)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not world.is_main,
                   unit="step", mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   dynamic_ncols=True)
        window_tokens, window_time = 0, 0.0  # since the last metrics line (evals excluded)
        smooth_tok_s = 0.0  # the bar's rate: an exponential average, steadier than one window
        try:
            while self.step < stop_at:
                t0 = time.perf_counter()
                loss, lr, norm = self.train_step()
                elapsed = time.perf_counter() - t0
                window_time += elapsed
                window_tokens += self.global_batch * args.seq_len
                tok_s = window_tokens / window_time
                rate = self.global_batch * args.seq_len / elapsed
                smooth_tok_s = rate if not smooth_tok_s else 0.9 * smooth_tok_s + 0.1 * rate
                bar.set_postfix_str(f"loss {loss:.3f} | {smooth_tok_s:,.0f} tok/s | lr {lr:.2e}",
                                    refresh=False)
                bar.update(1)
                step = self.step
                if step % args.log_every == 0 or step == stop_at:
                    self.metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                                        "tokens": self.tokens_at(step), "tokens_per_s": tok_s})
                    window_tokens, window_time = 0, 0.0
                if args.eval_every and step % args.eval_every == 0 and step < self.max_steps:
                    if world.is_main:
                        result = self.evaluate(args.eval_tokens)
                        self.metrics.write({"step": step, "tokens": self.tokens_at(step),
                                            "eval_cross_entropy": result["cross_entropy"],
                                            "eval_bits_per_byte": result["bits_per_byte"]})
                        bar.write(f"step {step}: eval {summarize(result)}")
                    dd.barrier(world)
                late = args.max_minutes > 0 and time.monotonic() - started > args.max_minutes * 60
                if dd.any_rank(world, stop.raised, self.device):
                    bar.write(f"stopping at step {step} on a signal: saving a checkpoint")
                    self.save()
                    return "signal"
                if dd.any_rank(world, late, self.device):
                    bar.write(f"--max_minutes reached at step {step}: saving a checkpoint")
                    self.save()
                    return "time"
                if step % args.save_every == 0 or step == stop_at:
                    self.save()
        finally:
            bar.close()
        return "stop_at_step" if self.step < self.max_steps else ""

    def _finish(self) -> dict[str, Any]:
        """The end of a complete run (rank 0): full eval, optional export, the loss plot."""
        result = self.evaluate(None)
        self.metrics.write({"step": self.step, "tokens": self.tokens_at(self.step),
                            "eval_cross_entropy": result["cross_entropy"],
                            "eval_bits_per_byte": result["bits_per_byte"], "final": True})
        _log(f"final eval ({result['tokens']:,} tokens): {summarize(result)}")
        if self.args.export_dir:
            save_checkpoint(self.args.export_dir, self.model, self.tokenizer,
                            dtype=torch.bfloat16,
                            metadata={"trained_tokens": self.source_tokens() +
                                      self.tokens_at(self.step),
                                      "eval_bits_per_byte": result["bits_per_byte"]},
                            extra_files={MARKER: marker_text(EXPORT_WRITER)})
            _log(f"exported {self.args.export_dir} (bf16, model + tokenizer)")
        _log(f"loss curve: {plot_metrics(self.out_dir)}")
        return {f"eval_{k}": v for k, v in result.items()}
