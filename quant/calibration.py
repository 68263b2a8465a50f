"""Calibration data and the block-by-block driver that GPTQ and AWQ share.

The default calibration text (quant/assets/calibration.txt, ~150 KB, public domain; see
quant/assets/README.md) is drawn from the training corpus' public-domain books and State
of the Union addresses, because calibration should look like the model's own data.
Windows are cut at random offsets from a seeded generator, so a run is reproducible.

The driver runs the blocks directly (`x = model.embed(ids); x = block(x, positions, rope,
i)`): for each block it finds the *stages* (the leaf linears that consume the same input
tensor, in the order the forward first reaches them: FAN proj, qkv.a, qkv.b, o.a, o.b,
{gate.a, up.a}, gate.b, up.b, down.a, down.b), captures each stage's input with the
stages before it already quantized (so the second CoLA factor is calibrated on what the
quantized first factor produces), hands it to the method, then feeds the quantized
block's outputs to the next block. It knows nothing about any particular method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer
from quant.config import QuantError

DEFAULT_CALIB_TEXT = Path(__file__).resolve().parent / "assets" / "calibration.txt"

# (block index, block, names of the stage's linears relative to the block, input (n, K))
StageFn = Callable[[int, nn.Module, list[str], torch.Tensor], None]


def calibration_ids(tokenizer: Tokenizer, text: str, n_samples: int, seq_len: int,
                    seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token windows at seeded random offsets of `text`.

    The text must hold at least n_samples * seq_len tokens, so windows overlap little and
    the calibration set is as large as it claims to be.
    """
    if n_samples <= 0 or seq_len <= 1:
        raise QuantError(f"calibration needs samples >= 1 and length >= 2, got {n_samples} "
                         f"samples of {seq_len} tokens")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < n_samples * seq_len:
        raise QuantError(
            f"the calibration text has {len(ids)} tokens, fewer than the {n_samples} samples "
            f"x {seq_len} tokens requested; pass a longer --calib_data or lower "
            "--calib_samples/--calib_seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])  # (n, T)


class _StopForward(Exception):
    """Raised from a hook once a stage's inputs are captured: the rest is not needed."""


def block_stages(block: nn.Module, x: torch.Tensor, positions: torch.Tensor, rope: nn.Module,
                 index: int) -> list[list[str]]:
    """Group the block's leaf linears by the input tensor they consume, in first-use order."""
    names = {mod: name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
    seen: list[tuple[str, torch.Tensor]] = []  # the tensors are kept so ids stay unique
    hooks = [mod.register_forward_pre_hook(
        lambda mod, args: seen.append((names[mod], args[0]))) for mod in names]
    try:
        with torch.no_grad():
            block(x, positions, rope, index)
    finally:
        for hook in hooks:
            hook.remove()
    stages: dict[int, list[str]] = {}
    for name, tensor in seen:
        group = stages.setdefault(id(tensor), [])
        if name not in group:
            group.append(name)
    return list(stages.values())


def _capture(block: nn.Module, stage: list[str], xs: list[torch.Tensor],
             positions: torch.Tensor, rope: nn.Module, index: int) -> torch.Tensor:
    """The (n_tokens, K) input of the stage's linears over every calibration batch (they
    share it, so the first one's input is grabbed and the forward stops there)."""
    grabbed: list[torch.Tensor] = []

    def grab(mod, args):
        grabbed.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise _StopForward

    hooks = [block.get_submodule(stage[0]).register_forward_pre_hook(grab, prepend=True)]
    try:
        for xb in xs:
            try:
                with torch.no_grad():
                    block(xb, positions[: len(xb)], rope, index)
            except _StopForward:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(grabbed)


def quantize_blockwise(model: FANformer, ids: torch.Tensor, stage_fn: StageFn,
                       true_sequential: bool = True, batch_size: int = 8,
                       desc: str = "quantizing", show_progress: bool = True) -> None:
    """Run `stage_fn` on every stage of every block, in order, on quantized-so-far inputs.

    `stage_fn` must leave the stage's linears computing with their quantized weights
    (fake-quantized `nn.Linear`s are fine) before it returns.
    """
    model.eval()
    seq_len, device = ids.shape[1], model.embed.weight.device
    positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    with torch.no_grad():  # (b, T, d) each
        xs = [model.embed(chunk.to(device)).float() for chunk in ids.split(batch_size)]
    bar = tqdm(total=len(model.blocks), desc=desc, unit="block", disable=not show_progress)
    for index, block in enumerate(model.blocks):
        stages = block_stages(block, xs[0][:1, : min(seq_len, 8)], positions[:1, :8],
                              model.rope, index)
        if not true_sequential:
            stages = [[name for stage in stages for name in stage]]
        for stage in stages:
            if true_sequential:
                inputs = _capture(block, stage, xs, positions, model.rope, index)
                stage_fn(index, block, stage, inputs)
            else:  # one pass on the float block: every linear sees unquantized inputs
                per_layer = {n: _capture(block, [n], xs, positions, model.rope, index)
                             for n in stage}
                for name in stage:
                    stage_fn(index, block, [name], per_layer[name])
        with torch.no_grad():
            xs = [block(xb, positions[: len(xb)], model.rope, index) for xb in xs]
        bar.update(1)
    bar.close()
