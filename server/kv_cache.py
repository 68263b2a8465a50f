"""The engine's KV cache pool: preallocated slots, and the per-step varlen attention.

`KVCachePool` holds keys and values for `num_slots` sequences of up to `max_len` tokens:
two (layers, slots, n_kv, max_len, hd) tensors allocated once at start. A sequence owns a
slot while it runs (the scheduler hands slots out); the token at position p lives at index
p of its slot, so lengths are the scheduler's `num_computed` and nothing is copied on free.

Each step the engine runs one forward over a flattened (1, N) batch: the decode tokens
(one per decoding sequence) first, then prefill chunks. `StepAttention` is the model's
`KVCache` for that step: it writes the step's k/v into the slots, runs one batched SDPA for
all decode rows (a view of the cache when their slots are contiguous, else a gather) and
one causal SDPA per prefill chunk. This module knows tensors and slots; it knows nothing of
requests or sampling. server/engine.py builds one `StepAttention` per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fanformer.config import ModelConfig

SPAN_MULTIPLE = 64  # decode attention spans are padded (and masked) to a multiple of this


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A step's metadata (ids, slots, positions) as an int64 tensor on `device`: on CUDA
    through pinned memory, so the copy does not block the host (one per list and step)."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device,
                                                                          non_blocking=True)
    return torch.tensor(values, dtype=torch.long, device=device)


class KVCachePool:
    def __init__(self, config: ModelConfig, num_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.n_layers, num_slots, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len
        self.device = torch.device(device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * item

    def describe(self) -> str:
        return (f"KV cache: {self.num_slots} slots x {self.max_len} tokens, "
                f"{self.k.dtype}, {self.nbytes / 2**20:.1f} MiB on {self.device}")


@dataclass
class Segment:
    """`length` tokens of the sequence in `slot`, at positions [start, start + length)."""

    slot: int
    start: int
    length: int


class StepAttention:
    """The model's `KVCache` for one step over a flattened (1, N) batch of segments."""

    def __init__(self, pool: KVCachePool, segments: list[Segment]):
        self.pool = pool
        device = pool.device
        slots = [s.slot for s in segments for _ in range(s.length)]
        positions = [s.start + i for s in segments for i in range(s.length)]
        self.write_slots = to_device(slots, device)  # (N,)
        self.write_pos = to_device(positions, device)  # (N,)
        self.positions = self.write_pos[None]  # (1, N): what the model's RoPE reads
        # the leading run of one-token segments is the batched decode group
        n_dec = 0
        while n_dec < len(segments) and segments[n_dec].length == 1:
            n_dec += 1
        self.n_dec = n_dec
        self.dec_view: slice | None = None
        self.dec_index: torch.Tensor | None = None
        self.dec_mask: torch.Tensor | None = None
        if n_dec:
            dec = segments[:n_dec]
            # The decode group reads its keys as a view of the cache when its slots are a
            # contiguous run (the scheduler hands out slots lowest-first and sorts the
            # decode rows by slot, so they usually are), else as one gather of the filled
            # prefix. SDPA's CPU kernel takes the strided view as it is (batched matmuls
            # would fall back to one small GEMM per sequence and head).
            # Batch invariance: with the span a multiple of SPAN_MULTIPLE and the mask
            # always given, a row's output is bitwise the same whatever the group's span
            # (measured, bf16 and fp32, spans up to 1024); an exact span or a missing mask
            # changes the kernel's blocking and the last bits.
            longest = max(s.start for s in dec) + 1
            self.dec_span = min(-(-longest // SPAN_MULTIPLE) * SPAN_MULTIPLE, pool.max_len)
            first = dec[0].slot
            if all(s.slot == first + i for i, s in enumerate(dec)):
                self.dec_view = slice(first, first + n_dec)
            else:
                self.dec_index = self.write_slots[:n_dec]  # one token each: same order
            keys = torch.arange(self.dec_span, device=device)
            last = self.write_pos[:n_dec]  # (D,) each decode row's position
            self.dec_mask = (keys[None, :] <= last[:, None])[:, None, None, :]  # (D,1,1,S)
        # prefill chunks: (token offset in the batch, slot, start, length, causal mask)
        self.chunks = []
        offset = n_dec
        for s in segments[n_dec:]:
            end = s.start + s.length
            mask = None
            if s.start > 0:
                keys = torch.arange(end, device=device)
                pos = torch.arange(s.start, end, device=device)
                mask = keys[None, :] <= pos[:, None]  # (T, S)
            self.chunks.append((offset, s.slot, s.start, s.length, mask))
            offset += s.length

    def attend(self, layer, positions, q, k, v):
        """q (1, H, N, hd), k/v (1, n_kv, N, hd) -> (1, H, N, hd)."""
        kc, vc = self.pool.k[layer], self.pool.v[layer]  # (slots, n_kv, max_len, hd)
        kc[self.write_slots, :, self.write_pos] = k[0].transpose(0, 1).to(kc.dtype)  # (N,n_kv,hd)
        vc[self.write_slots, :, self.write_pos] = v[0].transpose(0, 1).to(vc.dtype)
        outs = []
        if self.n_dec:
            span = self.dec_span
            if self.dec_view is not None:  # (D, n_kv, S, hd) strided views, no copy
                kd, vd = kc[self.dec_view, :, :span], vc[self.dec_view, :, :span]
            else:  # dense (D, n_kv, S, hd) copies; index_select is ~9x faster than kc[index]
                kd = torch.index_select(kc[:, :, :span], 0, self.dec_index)
                vd = torch.index_select(vc[:, :, :span], 0, self.dec_index)
            qd = q[0, :, : self.n_dec].transpose(0, 1)[:, :, None]  # (D, H, 1, hd)
            od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype),
                                                attn_mask=self.dec_mask, enable_gqa=True)
            outs.append(od[:, :, 0].transpose(0, 1)[None])  # (1, H, D, hd)
        for offset, slot, start, length, mask in self.chunks:
            qc = q[:, :, offset: offset + length]  # (1, H, T, hd)
            end = start + length
            kk = kc[slot: slot + 1, :, :end].to(q.dtype)  # (1, n_kv, S, hd)
            vv = vc[slot: slot + 1, :, :end].to(q.dtype)
            if mask is None:  # the chunk starts the sequence: plain causal attention
                oc = F.scaled_dot_product_attention(qc, kk, vv, is_causal=True, enable_gqa=True)
            else:
                oc = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=mask[None, None],
                                                    enable_gqa=True)
            outs.append(oc)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
