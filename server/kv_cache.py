"""The engine's paged KV cache: a pool of fixed-size blocks, and the per-step attention.

`KVCachePool` holds keys and values for `num_blocks` blocks of `block_size` tokens: two
(layers, n_kv, blocks, block_size, hd) tensors allocated once at start. A sequence's tokens
live in the blocks of its block table (server/block_pool.py decides which): position p at
offset p % block_size of block `table[p // block_size]`.

Each step the engine runs one forward over a flattened (1, N) batch: the decode tokens
(one per decoding sequence) first, then prefill chunks. `StepAttention` is the model's
`KVCache` for that step: it writes the step's k/v into their blocks, runs one batched SDPA
for all decode rows over a gather of their blocks, and one causal SDPA per prefill chunk.
Blocks sit on dim 2 so that one `index_select` of the decode rows' blocks, viewed as
(n_kv, rows, span, hd) and transposed, is what SDPA takes: one copy of the rows' K/V per
layer, no second one. (docs/ENGINE.md "The KV cache" measures it against the slot cache it
replaced, which read a strided view without any copy when the rows' slots were contiguous.)
This module knows tensors and block tables; it knows nothing of requests or sampling.
server/engine.py builds one `StepAttention` per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fanformer.config import ModelConfig

SPAN_MULTIPLE = 64  # decode attention spans are padded (and masked) to a multiple of this


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A step's metadata (ids, cache indices, positions) as an int64 tensor on `device`: on CUDA
    through pinned memory, so the copy does not block the host (one per list and step)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device,
                                                                          non_blocking=True)
    return torch.tensor(values, dtype=torch.long, device=device)


class KVCachePool:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.n_layers, config.n_kv_heads, num_blocks, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * item

    def describe(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens "
                f"({self.num_blocks * self.block_size} tokens), {self.k.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB on {self.device}")


@dataclass
class Segment:
    """`length` tokens of the sequence whose blocks are `blocks`, at positions
    [start, start + length)."""

    blocks: list[int]
    start: int
    length: int


class StepAttention:
    """The model's `KVCache` for one step over a flattened (1, N) batch of segments."""

    def __init__(self, pool: KVCachePool, segments: list[Segment]):
        self.pool = pool
        device = pool.device
        bs = pool.block_size
        positions = [s.start + i for s in segments for i in range(s.length)]
        flat = [s.blocks[p // bs] * bs + p % bs for s in segments
                for p in range(s.start, s.start + s.length)]
        self.write_index = to_device(flat, device)  # (N,) block * block_size + offset
        self.positions = to_device(positions, device)[None]  # (1, N): what RoPE reads
        # the leading run of one-token segments is the batched decode group
        n_dec = 0
        while n_dec < len(segments) and segments[n_dec].length == 1:
            n_dec += 1
        self.n_dec = n_dec
        if n_dec:
            dec = segments[:n_dec]
            # Batch invariance: with the span a multiple of SPAN_MULTIPLE and the mask
            # always given, a row's output is bitwise the same whatever the group's span
            # (measured, bf16 and fp32, spans up to 1024); an exact span or a missing mask
            # changes the kernel's blocking and the last bits.
            longest = max(s.start for s in dec) + 1
            step = math.lcm(SPAN_MULTIPLE, bs)
            self.dec_span = -(-longest // step) * step
            nb = self.dec_span // bs
            # (D * nb,) each row's blocks, padded with block 0 (masked out)
            table = [b for s in dec for b in (s.blocks + [0] * nb)[:nb]]
            self.dec_blocks = to_device(table, device)
            keys = torch.arange(self.dec_span, device=device)
            last = self.positions[0, :n_dec]  # (D,) each decode row's position
            self.dec_mask = (keys[None, :] <= last[:, None])[:, None, None, :]  # (D,1,1,S)
        # prefill chunks: (token offset in the batch, blocks or None, start, length, mask)
        self.chunks = []
        offset = n_dec
        for s in segments[n_dec:]:
            end = s.start + s.length
            mask = blocks = None
            if s.start > 0:  # attends over earlier tokens: read them from the blocks
                keys = torch.arange(end, device=device)
                pos = torch.arange(s.start, end, device=device)
                mask = keys[None, :] <= pos[:, None]  # (T, S)
                blocks = to_device(s.blocks[: -(-end // bs)], device)
            self.chunks.append((offset, blocks, end, s.length, mask))
            offset += s.length

    def attend(self, layer, positions, q, k, v):
        """q (1, H, N, hd), k/v (1, n_kv, N, hd) -> (1, H, N, hd)."""
        kc, vc = self.pool.k[layer], self.pool.v[layer]  # (n_kv, blocks, bs, hd)
        n_kv, num_blocks, bs, hd = kc.shape
        kflat = kc.view(n_kv, num_blocks * bs, hd)
        vflat = vc.view(n_kv, num_blocks * bs, hd)
        kflat.index_copy_(1, self.write_index, k[0].to(kc.dtype))  # k[0]: (n_kv, N, hd)
        vflat.index_copy_(1, self.write_index, v[0].to(vc.dtype))
        outs = []
        if self.n_dec:
            d, span = self.n_dec, self.dec_span
            # one copy of the rows' blocks, (n_kv, D * nb, bs, hd), seen as (D, n_kv, S, hd)
            kd = torch.index_select(kc, 1, self.dec_blocks).view(n_kv, d, span, hd)
            vd = torch.index_select(vc, 1, self.dec_blocks).view(n_kv, d, span, hd)
            qd = q[0, :, :d].transpose(0, 1)[:, :, None]  # (D, H, 1, hd)
            od = F.scaled_dot_product_attention(
                qd, kd.transpose(0, 1).to(q.dtype), vd.transpose(0, 1).to(q.dtype),
                attn_mask=self.dec_mask, enable_gqa=True)  # (D, H, 1, hd)
            outs.append(od[:, :, 0].transpose(0, 1)[None])  # (1, H, D, hd)
        for offset, blocks, end, length, mask in self.chunks:
            qc = q[:, :, offset: offset + length]  # (1, H, T, hd)
            if mask is None:  # the chunk starts the sequence: its own k/v, plain causal
                kk, vv = k[:, :, offset: offset + length], v[:, :, offset: offset + length]
                oc = F.scaled_dot_product_attention(qc, kk.to(kc.dtype).to(q.dtype),
                                                    vv.to(vc.dtype).to(q.dtype),
                                                    is_causal=True, enable_gqa=True)
            else:  # (1, n_kv, S, hd): the sequence's blocks up to the chunk's end
                kk = torch.index_select(kc, 1, blocks).view(1, n_kv, -1, hd)[:, :, :end]
                vv = torch.index_select(vc, 1, blocks).view(1, n_kv, -1, hd)[:, :, :end]
                oc = F.scaled_dot_product_attention(qc, kk.to(q.dtype), vv.to(q.dtype),
                                                    attn_mask=mask[None, None],
                                                    enable_gqa=True)
            outs.append(oc)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
