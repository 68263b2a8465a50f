"""AWQ (Lin et al. 2023, arXiv 2306.00978): activation-aware per-input-channel scaling.

Channels that carry large activations matter most, so AWQ multiplies weight column j by
s_j = mean|x_j|^alpha before quantizing (those columns then round more finely) and
divides the input by s_j, searching alpha on a grid to minimize the layers' output error;
then it searches, per output row and group, how much to clip the weight range. Both
searches follow llm-awq (MIT; re-implemented here, not copied). 4-bit asymmetric
group-wise, stored in AutoAWQ's GEMM layout.

Where the 1/s goes, for our block (this is the part the reference tools cannot do for us):
  - into the preceding RMSNorm's weight, only where that norm feeds nothing but this
    stage: `attn_norm` (block 0 / pre-norm) and `ffn_norm` in pre-norm FFNs. In HybridNorm
    blocks after the first, `ffn_norm`'s output is also the residual, so folding would
    change the model: not done;
  - into the output rows of `ffn.up` (its last linear, already quantized: its group
    scales are divided, which is exact) for `ffn.down`, since SwiGLU is linear in up(u);
  - everywhere else (the FAN layer's cos/sin output, CoLA's SiLU between factors,
    attention outputs, the raw residual stream) an explicit `input_scale` kept in the
    quantized layer: one multiply at run time, never a fold across a nonlinearity.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.calibration import quantize_blockwise
from quant.config import QuantConfig
from quant.convert import awq_layer, replace_module
from quant.rtn import QuantizedWeight, effective_group_size, grid_params, rtn_quantize

SCALE_GRID = 20  # alpha = 0, 0.05, ..., 0.95
CLIP_STEPS, CLIP_MAX_SHRINK = 20, 0.5  # try max * (1 - i/20) for i < 10
SEARCH_TOKENS, CLIP_TOKENS = 4096, 1024


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric group-wise quantize-dequantize of w (N, K) (AWQ's pseudo-quantizer)."""
    n, k = w.shape
    wg = w.reshape(-1, group_size)
    scale, zero = grid_params(wg, bits, sym=False)
    q = torch.clamp(torch.round(wg / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1)
    return ((q - zero[:, None]) * scale[:, None]).reshape(n, k)


def _subsample(x: torch.Tensor, count: int) -> torch.Tensor:
    step = max(x.shape[0] // count, 1)
    return x[::step][:count]


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits: int,
                 group_sizes: list[int]) -> torch.Tensor:
    """The per-input-channel scale s (K,) minimizing the stage's output error."""
    x = _subsample(x, SEARCH_TOKENS)
    x_mean = x.abs().mean(0)
    targets = [x @ w.T for w in weights]
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for r in range(SCALE_GRID):
        s = x_mean.pow(r / SCALE_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, gs, y in zip(weights, group_sizes, targets):
            wq = fake_quantize_groups(w * s, bits, gs) / s
            loss += float((x @ wq.T - y).pow(2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Clipped weight: per (row, group) the range shrink minimizing that group's output
    error on x (T, K); w (N, K) -> (N, K)."""
    x = _subsample(x, CLIP_TOKENS)
    n, k = w.shape
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size)  # (T, G, gs)
    wg = w.reshape(n, groups, group_size)  # (N, G, gs)
    target = torch.einsum("tgk,ngk->tgn", xg, wg)
    org_max = wg.abs().amax(-1, keepdim=True)  # (N, G, 1)
    best_max = org_max.clone()
    best_err = torch.full((n, groups, 1), float("inf"), device=w.device)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_STEPS)):
        max_val = org_max * (1 - i / CLIP_STEPS)
        clipped = torch.clamp(wg, -max_val, max_val)
        q = fake_quantize_groups(clipped.reshape(n, k), bits, group_size).reshape(wg.shape)
        out = torch.einsum("tgk,ngk->tgn", xg, q)
        err = (out - target).pow(2).mean(0).T[..., None]  # (N, G, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return torch.clamp(wg, -best_max, best_max).reshape(n, k)


def fold_target(block: nn.Module, stage: list[str]) -> tuple[str, str] | None:
    """Where this stage's 1/s can be folded exactly: ('norm', name), ('rows', name), None."""
    first = stage[0]
    if first == "attn.fan.proj" or (first in ("attn.qkv", "attn.qkv.a")
                                    and block.attn.fan is None):
        return ("norm", "attn_norm") if block.attn_norm is not None else None
    if first in ("ffn.gate", "ffn.gate.a"):
        return ("norm", "ffn_norm") if block.prenorm_ffn else None
    if first in ("ffn.down", "ffn.down.a"):
        return ("rows", "ffn.up.b" if first == "ffn.down.a" else "ffn.up")
    return None


def quantize_awq(model: nn.Module, ids: torch.Tensor, qc: QuantConfig,
                 clip: bool = True, show_progress: bool = True) -> None:
    """AWQ every leaf linear of every block in place (AutoAWQ GEMM layers at the end)."""
    results: dict[str, dict] = {}

    def stage_fn(index: int, block: nn.Module, stage: list[str], x: torch.Tensor) -> None:
        linears = [block.get_submodule(name) for name in stage]
        sizes = [effective_group_size(lin.in_features, qc.group_size) for lin in linears]
        weights = [lin.weight.detach().float() for lin in linears]
        s = search_scale(x, weights, qc.bits, sizes)
        target = fold_target(block, stage)
        if target is not None and target[0] == "rows" and f"blocks.{index}.{target[1]}" \
                not in results:
            target = None  # the producer is not quantized here (unusual); keep s explicit
        for name, lin, gs, w in zip(stage, linears, sizes, weights):
            scaled = w * s
            if clip and "qkv" not in name:  # clipping q/k hurts (the QK product), as in AWQ
                scaled = search_clip(x / s, scaled, qc.bits, gs)
            q = rtn_quantize(scaled, qc.bits, gs, sym=False)
            explicit = target is None
            lin.weight.data = q.dequantize() / s if explicit else q.dequantize()
            results[f"blocks.{index}.{name}"] = {
                "q": q, "bias": lin.bias, "gs": gs, "input_scale": 1 / s if explicit else None}
        if target is not None:
            _fold(block, index, target, s, results)

    quantize_blockwise(model, ids, stage_fn, true_sequential=True, desc="awq",
                       show_progress=show_progress)
    for name, r in results.items():
        replace_module(model, name, awq_layer(r["q"], r["bias"], r["gs"], r["input_scale"]))


def _fold(block: nn.Module, index: int, target: tuple[str, str], s: torch.Tensor,
          results: dict[str, dict]) -> None:
    """Divide the producer of this stage's input by s: a norm's gain, or a quantized
    linear's output rows (its per-row group scales and bias)."""
    kind, name = target
    module = block.get_submodule(name)
    if kind == "norm":
        module.weight.data = module.weight.data / s.to(module.weight.dtype)
        return
    record = results[f"blocks.{index}.{name}"]
    q: QuantizedWeight = record["q"]
    q.scales = (q.scales / s[None, :]).to(torch.float16).float()
    module.weight.data = q.dequantize()
    if record["input_scale"] is not None:
        module.weight.data = module.weight.data * record["input_scale"][None, :]
    if module.bias is not None:
        module.bias.data = module.bias.data / s
