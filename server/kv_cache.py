"""The engine's paged KV cache: a pool of fixed-size blocks, and the per-step attention.

`KVCachePool` holds keys and values for `num_blocks` blocks of `block_size` tokens: two
(layers, n_kv, blocks, block_size, hd) tensors allocated once at start. A sequence's tokens
live in the blocks of its block table (server/block_pool.py decides which): position p at
offset p % block_size of block `table[p // block_size]`.

Each step the engine runs one forward over a flattened (1, N) batch: the decode tokens
(one per decoding sequence) first, then prefill chunks. `StepAttention` is the model's
`KVCache` for that step: it writes the step's k/v into their blocks, runs the decode rows'
attention, and one causal SDPA per prefill chunk. On CPU the decode rows run the native
kernel (quant/native_cpu.c `fanformer_paged_decode`, where it runs: each row reads its own
blocks in place through its block table, 2-3x the gather below at 16-64 rows,
docs/ENGINE.md), or cascade decode when rows share a prefix (below); elsewhere one batched
SDPA for all decode rows over a gather of their blocks. A step the native decode step runs
(server/native_step.py) makes every token a row of that kernel, a prefill chunk's too: each
token reads its sequence's blocks up to its own position, written earlier in the same layer.
Blocks sit on dim 2 so that one `index_select` of the decode rows' blocks, viewed as
(n_kv, rows, span, hd) and transposed, is what SDPA takes: one copy of the rows' K/V per
layer, no second one. (docs/ENGINE.md "The KV cache" measures it against the slot cache it
replaced, which read a strided view without any copy when the rows' slots were contiguous.)
Cascade decode (CPU, unless the engine is batch-invariant): when several decode rows share
their leading blocks (prefix caching gives a chat's system prompt the same block ids in
every row), copying that prefix once per row dominates the step. Then the rows' queries
attend to the shared prefix once, as one unmasked sequence, reading its K/V as a view when
its blocks are a contiguous run; each row attends to its own remaining blocks (gather +
masked SDPA as above, over the suffix only); `merge_attention` combines the two by their
log-sum-exps. A row's bits then depend on its neighbours, hence the batch-invariant opt-out.
This module knows tensors and block tables; it knows nothing of requests or sampling.
server/engine.py builds one `StepAttention` per step.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fanformer.config import ModelConfig
from quant import native_cpu

SPAN_MULTIPLE = 64  # decode attention spans are padded (and masked) to a multiple of this
CASCADE_MIN_ROWS = 2  # decode rows that must share a prefix for cascade decode
CASCADE_MIN_BLOCKS = 4  # and how many leading blocks they must share
# where the native kernel reads the rows' blocks in place, it beats cascade up to a shared
# prefix of ~640-1000 tokens (docs/ENGINE.md "Native decode attention"): cascade from here
CASCADE_NATIVE_MIN_TOKENS = 768
# the CPU flash-attention op that F.scaled_dot_product_attention dispatches to on CPU; called
# directly because it also returns each query's log-sum-exp, (B, H, L) fp32
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


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


def shared_prefix(dec: list[Segment], block_size: int, native: bool = False
                  ) -> tuple[list[int], list[int]] | None:
    """The decode rows that share the most common first block, and the leading blocks they
    all share that every one of them sees whole (before its own token); None when fewer than
    CASCADE_MIN_ROWS rows share CASCADE_MIN_BLOCKS blocks (CASCADE_NATIVE_MIN_TOKENS worth
    of blocks where the native decode kernel would read them otherwise: `native`). One group
    per step: the common case is a chat's system prompt shared by all.
    -> (row indices into `dec`, block ids)."""
    first, count = Counter(s.blocks[0] for s in dec).most_common(1)[0]
    if count < CASCADE_MIN_ROWS:
        return None
    rows = [i for i, s in enumerate(dec) if s.blocks[0] == first]
    limit = min(dec[i].start for i in rows) // block_size
    lead = dec[rows[0]].blocks
    n = 0
    while n < limit and all(dec[i].blocks[n] == lead[n] for i in rows):
        n += 1
    least = -(-CASCADE_NATIVE_MIN_TOKENS // block_size) if native else CASCADE_MIN_BLOCKS
    return (rows, lead[:n]) if n >= least else None


def as_run(ids: list[int], device: torch.device) -> slice | torch.Tensor:
    """Ids as an index: a slice (indexing gives a view) when they are an ascending run,
    else an int64 tensor (indexing gathers, once)."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return to_device(ids, device)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and B from attention over each: out (..., hd) and lse (...) ->
    (..., hd) fp32. Weights exp(lse - max) so neither exponent overflows."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m)[..., None], torch.exp(lse_b - m)[..., None]
    return (out_a.float() * wa + out_b.float() * wb) / (wa + wb)


class StepAttention:
    """The model's `KVCache` for one step over a flattened (1, N) batch of segments."""

    def __init__(self, pool: KVCachePool, segments: list[Segment], cascade: bool = False,
                 every_token_a_row: bool = False):
        """`cascade`: allow cascade decode (CPU only; it is off for a batch-invariant engine).
        `every_token_a_row`: every token of the step, a prefill chunk's too, is a row of the
        native decode attention over its sequence's blocks up to its own position (the
        native step's steps: server/native_step.py); the caller checks that it runs here."""
        self.pool = pool
        device = pool.device
        bs = pool.block_size
        positions = [s.start + i for s in segments for i in range(s.length)]
        flat = [s.blocks[p // bs] * bs + p % bs for s in segments
                for p in range(s.start, s.start + s.length)]
        self.write_index = to_device(flat, device)  # (N,) block * block_size + offset
        self.positions = to_device(positions, device)[None]  # (1, N): what RoPE reads
        self.prefix = None  # cascade decode: (row indices, prefix blocks) or None
        if every_token_a_row:
            # a chunk's tokens share its table; each reads only its first p + 1 positions
            tables = [s.blocks[: -(-(s.start + s.length) // bs)] for s in segments]
            rows = [t for s, t in zip(segments, tables) for _ in range(s.length)]
            self.native = native_cpu.PagedDecode(rows, [p + 1 for p in positions],
                                                 pool.num_blocks, bs)
            self.n_dec, self.chunks = len(positions), []
            return
        # the leading run of one-token segments is the batched decode group
        n_dec = 0
        while n_dec < len(segments) and segments[n_dec].length == 1:
            n_dec += 1
        self.n_dec = n_dec
        self.native = None  # native decode attention over the block tables, or None
        if n_dec:
            dec = segments[:n_dec]
            native = device.type == "cpu" and native_cpu.library() is not None and \
                pool.k.dtype in (torch.bfloat16, torch.float32)
            if cascade and device.type == "cpu":
                self.prefix = shared_prefix(dec, bs, native)
            if self.prefix is None and native:
                # each row reads its own blocks in place: no gather, no padding, no mask
                self.native = native_cpu.PagedDecode(
                    [s.blocks[: s.start // bs + 1] for s in dec], [s.start + 1 for s in dec],
                    pool.num_blocks, bs)
            else:
                self._plan_dense(dec)
        self._plan_chunks(segments, n_dec)

    def _plan_dense(self, dec: list[Segment]) -> None:
        """The decode rows' gather (and cascade) metadata: each row's blocks as one padded
        table, and its mask."""
        device, bs, n_dec = self.pool.device, self.pool.block_size, self.n_dec
        skip = [0] * n_dec  # leading blocks a row's own attention leaves to the prefix
        if self.prefix is not None:
            self._plan_prefix(*self.prefix, skip)
            step = bs  # no batch invariance to keep: pad to whole blocks only
        else:
            # Batch invariance: with the span a multiple of SPAN_MULTIPLE and the mask
            # always given, a row's output is bitwise the same whatever the group's span
            # (measured, bf16 and fp32, spans up to 1024); an exact span or a missing
            # mask changes the kernel's blocking and the last bits.
            step = math.lcm(SPAN_MULTIPLE, bs)
        longest = max(s.start + 1 - k * bs for s, k in zip(dec, skip))
        self.dec_span = -(-longest // step) * step
        nb = self.dec_span // bs
        # (D * nb,) each row's blocks after its skipped ones, padded with block 0 (masked)
        table = [b for s, k in zip(dec, skip) for b in (s.blocks[k:] + [0] * nb)[:nb]]
        self.dec_blocks = to_device(table, device)
        keys = torch.arange(self.dec_span, device=device)
        # (D,) each decode row's position, less the tokens of its skipped blocks
        last = self.positions[0, :n_dec] - to_device([k * bs for k in skip], device)
        self.dec_mask = (keys[None, :] <= last[:, None])[:, None, None, :]  # (D,1,1,S)

    def _plan_chunks(self, segments: list[Segment], n_dec: int) -> None:
        """The prefill chunks: (token offset in the batch, blocks or None, start, length,
        mask)."""
        device, bs = self.pool.device, self.pool.block_size
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
        if self.prefix is not None:
            outs.append(self._cascade_decode(kc, vc, q))
        elif self.native is not None:
            qd = q[0, :, :self.n_dec].transpose(0, 1).contiguous()  # (D, H, hd)
            od = self.native(qd.to(kc.dtype), kc, vc).to(q.dtype)  # (D, H, hd)
            outs.append(od.transpose(0, 1)[None])  # (1, H, D, hd)
        elif self.n_dec:
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

    def _plan_prefix(self, rows: list[int], blocks: list[int], skip: list[int]):
        """Cascade decode's metadata: which rows read the prefix, and its blocks (a slice of
        the pool when they are an ascending run, else their ids for one gather)."""
        for i in rows:
            skip[i] = len(blocks)
        self.prefix_rows = as_run(rows, self.pool.device)
        self.prefix_blocks = as_run(blocks, self.pool.device)
        self._bias = None  # dec_mask as the additive mask the op takes, in q's dtype

    def _cascade_decode(self, kc, vc, q):
        """Decode attention as shared prefix + each row's suffix, merged: (1, H, D, hd).
        GQA without expanding K/V: the g query heads of a KV head fold into the query
        length (the prefix has no mask; the suffix's mask is the same for all of a row's
        heads)."""
        n_kv, _, bs, hd = kc.shape  # kc/vc: (n_kv, blocks, bs, hd)
        d, span = self.n_dec, self.dec_span
        h = q.shape[1]
        g = h // n_kv
        # each row over its own blocks: (D, n_kv, S, hd), queries (D, n_kv, g, hd)
        kd = torch.index_select(kc, 1, self.dec_blocks).view(n_kv, d, span, hd).transpose(0, 1)
        vd = torch.index_select(vc, 1, self.dec_blocks).view(n_kv, d, span, hd).transpose(0, 1)
        qd = q[0, :, :d].transpose(0, 1).reshape(d, n_kv, g, hd)
        if self._bias is None or self._bias.dtype != q.dtype:  # built once per step
            self._bias = torch.zeros(self.dec_mask.shape, dtype=q.dtype,
                                     device=q.device).masked_fill(~self.dec_mask, -math.inf)
        out, lse = _flash_cpu(qd, kd.to(q.dtype), vd.to(q.dtype), 0.0, False,
                              attn_mask=self._bias)  # (D, n_kv, g, hd), (D, n_kv, g)
        # the prefix rows' queries as one (1, n_kv, g * G, hd) sequence over the prefix
        qg = q[0, :, :d][:, self.prefix_rows]  # (H, G, hd)
        rows = qg.shape[1]
        kp, vp = kc[:, self.prefix_blocks], vc[:, self.prefix_blocks]  # (n_kv, P/bs, bs, hd)
        plen = kp.shape[1] * bs
        op, lsep = _flash_cpu(qg.reshape(1, n_kv, g * rows, hd),
                              kp.reshape(1, n_kv, plen, hd).to(q.dtype),
                              vp.reshape(1, n_kv, plen, hd).to(q.dtype), 0.0, False)
        op = op.view(n_kv, g, rows, hd).permute(2, 0, 1, 3)  # (G, n_kv, g, hd)
        lsep = lsep.view(n_kv, g, rows).permute(2, 0, 1)  # (G, n_kv, g)
        out[self.prefix_rows] = merge_attention(
            out[self.prefix_rows], lse[self.prefix_rows], op, lsep).to(out.dtype)
        return out.reshape(d, h, hd).transpose(0, 1)[None]  # (1, H, D, hd)
