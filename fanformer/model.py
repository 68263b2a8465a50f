"""The FANformer language model (and its dense pre-norm baseline), as docs/MODEL.md specifies.

The model knows `(input_ids, positions, kv_cache)` and nothing else: the cache is owned by
the caller (the reference loop in `generate.py`, or the serving engine), which decides
where each sequence's keys and values live. The model only asks the cache, once per layer,
to store this step's keys/values and attend over what it holds (see `KVCache`).
Without a cache, attention is causal over the window; positions that restart at 0 inside a
row start a new document that attends only to itself (document-masked packing; which
tokens end a document is the caller's business, see `fanformer.data.document_positions`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fanformer.config import ModelConfig
from fanformer.layers import FANLayer, RotaryEmbedding, SwiGLU, init_weights, make_linear


class KVCache(Protocol):
    """What the model needs from a cache; the caller owns storage, lengths and allocation.

    One call per layer: store this step's keys/values, then attend over everything the
    cache holds for these sequences. The cache, not the model, runs the attention because
    only it knows the layout (a contiguous buffer, slots, a flattened varlen batch, pages).
    """

    def attend(self, layer: int, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, n_kv, T, hd) of the tokens at `positions` (B, T) for `layer`, then
        return causal grouped-query attention of q (B, H, T, hd) over them: (B, H, T, hd)."""
        ...


class ContiguousKVCache:
    """The simplest cache: one preallocated (B, n_kv, max_len, hd) buffer per layer.

    Row b of the batch is sequence b; token at position p is stored at index p. Used by the
    reference generation loop and the tests; the engine has its own pooled cache.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = max_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def attend(self, layer, positions, q, k, v):
        batch, steps = positions.shape
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, steps)
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, n_kv, hd)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        span = int(positions.max()) + 1  # attend only over the filled prefix
        keys = torch.arange(span, device=positions.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # (B, T, S)
        k_all = self.k[layer][:, :, :span].to(q.dtype)  # (B, n_kv, S, hd)
        v_all = self.v[layer][:, :, :span].to(q.dtype)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None],
                                              enable_gqa=True)


class Attention(nn.Module):
    """FAN layer -> CoLA QKV -> per-head RMSNorm on q, k, v -> RoPE -> GQA SDPA -> CoLA O."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.dropout = c.dropout
        self.fan = FANLayer(c.d_model, c.fan_p) if c.fan_p > 0 else None
        self.qkv = make_linear(c.d_model, c.d_model + 2 * c.kv_dim, c.cola_rank)
        self.o = make_linear(c.d_model, c.d_model, c.cola_rank)
        # HybridNorm's QKV-norm: RMSNorm per head (gain of size head_dim) before RoPE.
        qkv_norm = c.norm == "hybrid"
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None
        self.v_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None

    def forward(self, h, positions, rope, layer, kv_cache=None, mask=None):
        B, T, _ = h.shape
        x_f = self.fan(h) if self.fan is not None else h  # (B, T, d)
        q, k, v = self.qkv(x_f).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        qk = rope(torch.cat([q, k], dim=2), positions)  # (B, T, H + n_kv, hd): one rotation
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if kv_cache is None:
            out = F.scaled_dot_product_attention(  # mask None: the plain causal kernel
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True,
                dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        else:
            out = kv_cache.attend(layer, positions, q, k, v)  # (B, H, T, hd)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """One block. HybridNorm*: block 0 pre-norms attention and the FFN; later blocks use
    QKV-norm attention on the raw stream and a post-norm FFN whose residual is Norm(y)."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        c = config
        self.prenorm_ffn = c.norm == "pre" or index == 0
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps) if (
            c.norm == "pre" or index == 0) else None
        self.attn = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.ffn = SwiGLU(c.d_model, c.d_ff, c.cola_rank)
        self.drop = nn.Dropout(c.dropout)
        if c.gated_residual:  # per-channel gates, sigmoid(0) = 0.5 at init
            self.attn_gate = nn.Parameter(torch.zeros(c.d_model))
            self.ffn_gate = nn.Parameter(torch.zeros(c.d_model))
        else:
            self.attn_gate = self.ffn_gate = None

    @staticmethod
    def _gated(gate: nn.Parameter | None, branch: torch.Tensor) -> torch.Tensor:
        return branch if gate is None else torch.sigmoid(gate).to(branch.dtype) * branch

    def forward(self, x, positions, rope, layer, kv_cache=None, mask=None):
        h = self.attn_norm(x) if self.attn_norm is not None else x
        a = self.attn(h, positions, rope, layer, kv_cache, mask)
        y = x + self._gated(self.attn_gate, self.drop(a))
        n = self.ffn_norm(y)
        residual = y if self.prenorm_ffn else n  # post-norm: the normed stream is the residual
        return residual + self._gated(self.ffn_gate, self.drop(self.ffn(n)))


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask (B, 1, T, T) of a packed window, True = attend.

    Token t belongs to document number (count of zeros in positions[: t + 1]): every 0
    starts a document, so positions 0..T-1 are one document (the plain causal mask) and
    positions that never reach 0 (a continuation) are one document too. An explicit
    (B, T, T) mask takes SDPA off its fused causal kernel: this is the cost of packing
    documents without letting them see each other (docs/TRAINING.md measures it).
    """
    doc = (positions == 0).cumsum(-1)  # (B, T)
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()  # (T, T)
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


class FANformer(nn.Module):
    """Embedding -> blocks -> RMSNorm -> tied LM head (a leaf linear sharing the embedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        if not any(p.is_meta for p in self.parameters()):
            init_weights(self, config.n_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab_size).

        Without a cache, attention is causal over the T tokens given (positions default to
        0..T-1); given positions that restart at 0 inside a row, each restart begins a
        document that attends only to itself (`document_mask`). With a cache, `positions`
        (B, T) say where each token sits in its sequence.
        """
        logits = self.lm_head(self.hidden_states(input_ids, positions, kv_cache))
        return logits[..., : self.config.vocab_size]  # (B, T, vocab)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, d) that the LM head reads; callers that need
        logits for a few rows only (the serving engine) apply `lm_head` to those rows."""
        B, T = input_ids.shape
        mask = None
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        elif kv_cache is None:
            mask = document_mask(positions)
        x = self.embed(input_ids)  # (B, T, d)
        rope = self.rope.at(positions, x.dtype)  # every layer rotates with the same tables
        for i, block in enumerate(self.blocks):
            x = block(x, positions, rope, i, kv_cache, mask)
        return self.norm(x)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Rebuild the RoPE table (not saved in checkpoints) on `device`, e.g. after meta init."""
        c = self.config
        with torch.device(device):
            self.rope = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta)

    def num_parameters(self) -> int:
        """Unique parameters (the tied head is counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
