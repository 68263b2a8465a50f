"""Building blocks of the FANformer: CoLA low-rank linears, the FAN layer, RoPE, SwiGLU.

Every projection here is a leaf `nn.Linear` (a CoLA layer is two of them), so the `quant`
package can swap leaves for quantized modules without touching this code. Nothing here
knows about caches, tokenizers or training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CoLALinear(nn.Module):
    """CoLA (Liu et al. 2025): y = B(SiLU(A x)), a low-rank layer with a nonlinearity inside.

    Because of the SiLU between the factors this is not one matrix: quantization treats
    `a` and `b` as two separate linears and never folds scales across the activation.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)
        # The CoLA paper's init: N(0, 1) * r^(-1/4) * (in + out)^(-1/4) for both factors.
        self.init_std = rank ** -0.25 * (in_features + out_features) ** -0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.silu(self.a(x)))


def make_linear(in_features: int, out_features: int, rank: int, bias: bool = False) -> nn.Module:
    """A CoLA layer when `rank` > 0, else a dense `nn.Linear`."""
    if rank > 0:
        return CoLALinear(in_features, out_features, rank, bias)
    return nn.Linear(in_features, out_features, bias=bias)


class FANLayer(nn.Module):
    """FANformer's Fourier features (Dong et al. 2025): X_F = [cos(P) | sin(P) | G].

    P = W_p h + b_p (width floor(d*p)) and G = W_g h + b_g (width d - 2 floor(d*p)) come from
    one leaf linear with a bias (the learnable phase); the output keeps the width d, laid out
    as the cos block, then the sin block, then the linear block.
    """

    def __init__(self, d_model: int, p: float):
        super().__init__()
        self.periodic_dim = int(d_model * p)
        self.linear_dim = d_model - 2 * self.periodic_dim
        self.proj = nn.Linear(d_model, self.periodic_dim + self.linear_dim, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pg = self.proj(h)  # (B, T, p + g)
        p, g = pg.split([self.periodic_dim, self.linear_dim], dim=-1)
        return torch.cat([torch.cos(p), torch.sin(p), g], dim=-1)  # (B, T, d)


class SwiGLU(nn.Module):
    """FFN(u) = Down(SiLU(Gate(u)) * Up(u)); Gate/Up/Down are CoLA layers when rank > 0."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.gate = make_linear(d_model, d_ff, rank)
        self.up = make_linear(d_model, d_ff, rank)
        self.down = make_linear(d_ff, d_model, rank)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(u)) * self.up(u))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd) rotated (rotate-half layout) by cos/sin (B, T, 1, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half layout) with a precomputed fp32 cos/sin table indexed by position.

    The rotation runs in the activations' dtype, as HF's Llama does: in bf16 inference an
    fp32 round trip cost four casts per layer for no gain the bf16 result can keep. A
    forward over many layers takes the tables once (`at`) and hands them to every layer.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (S, hd/2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """The cos/sin tables of positions (B, T) in `dtype`, for every layer of a forward."""
        cos = self.cos[positions].unsqueeze(2).to(dtype)  # (B, T, 1, hd/2)
        return RotaryTables(cos, self.sin[positions].unsqueeze(2).to(dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H, hd), positions: (B, T) -> x rotated by its positions."""
        return self.at(positions, x.dtype)(x, positions)


@dataclass(frozen=True)
class RotaryTables:
    """A RotaryEmbedding bound to one forward's positions: called like the module (the
    positions argument is the one the tables were taken for)."""

    cos: torch.Tensor  # (B, T, 1, hd/2)
    sin: torch.Tensor

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return _rotate(x, self.cos, self.sin)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 style init for dense layers, the CoLA paper's init for CoLA factors.

    Output projections that write into the residual stream are scaled by 1/sqrt(2 L).
    """
    residual_scale = 1.0 / math.sqrt(2 * n_layers)
    for name, mod in module.named_modules():
        if isinstance(mod, CoLALinear):
            nn.init.normal_(mod.a.weight, std=mod.init_std)
            nn.init.normal_(mod.b.weight, std=mod.init_std)
            if mod.b.bias is not None:
                nn.init.zeros_(mod.b.bias)
        elif isinstance(mod, nn.Linear) and not _inside_cola(module, name):
            std = 0.02 * (residual_scale if name.endswith(("attn.o", "ffn.down")) else 1.0)
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=0.02)


def _inside_cola(root: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(root.get_submodule(parent), CoLALinear)
