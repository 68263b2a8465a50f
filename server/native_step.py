"""The native decode step: the blocks of a bf16 model for a step's rows in C
(quant/native_step.c), instead of ~2,000 aten calls. A row is a decode token, or one token
of a prefill chunk: attention takes each token alone, over its sequence up to itself.

A one-row decode step is overhead-bound: its 61 linears are a third (4-bit) to two thirds
(bf16) of it, the rest is small aten ops, Python and OpenMP wake-ups (docs/ENGINE.md "The
native decode step"). Two ways, chosen per model when the engine starts:

  fused: every projection of every block is a quantized layer on the native kernel (4-bit;
      int8 on the AVX-512 build) or a bf16 nn.Linear (the C file's own bf16 linear, on the
      layer's weight in place): the whole step is one C call and one OpenMP region. With
      bf16 linears only up to DENSE_FUSED_MAX_ROWS rows (where that kernel beats oneDNN's
      GEMM: 12 with AMX, 24 without), phased above; their LM head then runs on the same
      kernel (`logits`).
  phased: any other bf16 model (nf4, ...), or more rows: per block, torch runs each
      projection (the very modules of the eager model, so the same bits) and C the
      elementwise work between them in 6 calls (norms, FAN features, RoPE, the cache
      write and paged attention, residuals, SwiGLU).

Both round to bf16 wherever the eager bf16 model rounds, so they agree with it to bf16
rounding: bitwise on the tests' quantized models, not guaranteed (RMSNorm's sum order,
expf and cosf against torch's vectorized ones); the bf16 linear sums in another order than
oneDNN, so a fused bf16 step is within bf16 rounding of the eager one, not bitwise. Each row
is computed alone: a row's bits do not depend on the other rows of a step of its way.

`NativeDecodeStep.build(model, pool)` returns None, with the reason logged once, unless the
model and its KV cache are bf16 on CPU and the native kernels run here. The engine calls it
for decode steps of at most FUSED_MAX_ROWS or PHASED_MAX_ROWS rows, for steps carrying
prefill chunks of at most PHASED_MIXED_MAX_TOKENS tokens (fused up to the fused bound,
phased above it) whose rows are short (PREFILL_MAX_MEAN_KEYS: past that torch's flash
attention over a chunk beats a row at a time: docs/ENGINE.md "Prefill in the native
step"), and above FUSED_SHARED_MAX_ROWS or
PHASED_SHARED_MAX_ROWS decode rows only when none share a prefix: such a step keeps cascade
decode, which reads the shared blocks once for all the rows. A prompt's rows agree with the
eager model's SDPA to bf16 rounding, not to the bit. The embedding, the final norm and the
LM head stay in torch.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch
from torch import nn

from fanformer.layers import CoLALinear
from fanformer.model import FANformer
from quant import native_cpu
from quant.layers import QuantLinear
from server.cpu_linear import CPULinear
from server.kv_cache import KVCachePool, Segment, StepAttention, shared_prefix

log = logging.getLogger(__name__)

# the most one-token rows a step may have to take each way (docs/ENGINE.md "The native decode
# step"), and the most when rows share a prefix that cascade decode would read once for them
# (above that, the eager step with cascade decode is the faster one)
FUSED_MAX_ROWS, PHASED_MAX_ROWS = 64, 64
FUSED_SHARED_MAX_ROWS, PHASED_SHARED_MAX_ROWS = 32, 16
# the most tokens of a step that carries prefill chunks (each token a row, attending over its
# own sequence up to itself) to run phased; fused ones stop at the fused bound as above. And
# the most positions a chunk's token may attend to on average: the C file's attention takes
# one row at a time, torch's flash attention a block of a chunk's rows at once; that wins
# once the rows are long, against the ~0.2 ms a token the native step saves elsewhere
# (docs/ENGINE.md "Prefill in the native step")
PHASED_MIXED_MAX_TOKENS = 512
PREFILL_MAX_MEAN_KEYS = 192
# from this many rows the phased step's elementwise phases run on every thread (below, on
# the calling thread: waking the team would cost more than it saves)
PHASED_TEAM_MIN_ROWS = 128
# the most rows a step with bf16 linears takes fused (C's bf16 linear), phased above: the
# kernel is GEMV-shaped, and oneDNN's bf16 GEMM overtakes it from about 16 rows on a CPU
# with AMX tiles, from about 32 on one without (docs/ENGINE.md "bf16 linears in C")
DENSE_FUSED_MAX_ROWS = {"amx": 12, "no amx": 24}
DISABLE_ENV = "FANFORMER_NATIVE_STEP"  # "0": decode steps run the eager model (comparisons)

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# the C file's rows_t, in order, and fanformer_block_phase's phases
ROWS = ("h", "xf", "qkv", "q", "attn", "a", "y", "n", "g", "u", "f")
ATTN_NORM, FAN_FEATURES, ATTENTION, ATTN_RESIDUAL, SWIGLU, FFN_RESIDUAL = range(6)


class _Linear(ctypes.Structure):
    _fields_ = [("packed", _PTR), ("scale", _PTR), ("minus_zs", _PTR), ("bias", _PTR),
                ("perm", _PTR), ("in_scale", _PTR), ("K", _I64), ("N", _I64), ("Np", _I64),
                ("gs", _I64), ("bits", _I64)]


class _Proj(ctypes.Structure):
    _fields_ = [("a", _Linear), ("b", _Linear), ("cola", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Proj) for name in ("fan", "qkv", "o", "gate", "up", "down")] + \
               [(name, _PTR) for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm",
                                          "v_norm", "attn_gate", "ffn_gate", "kc", "vc")] + \
               [("fan_periodic", _I64), ("prenorm_ffn", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("R", "d", "H", "n_kv", "hd", "n_layers",
                                          "num_blocks", "bs", "table_stride", "max_width")] + \
               [("eps", ctypes.c_float), ("scale", ctypes.c_float)] + \
               [(name, _PTR) for name in ("cos", "sin", "write_index", "tables", "lens")]


class _Rows(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in ROWS]


class Unsupported(Exception):
    """Why a model cannot take the fused step."""


class NativeDecodeStep:
    """Built once per engine from the model and its KV pool; called per eligible step."""

    def __init__(self, model: FANformer, pool: KVCachePool, lib: ctypes.CDLL,
                 fused: bool = True):
        """`fused=False` builds the phased step even where the fused one could run."""
        c = model.config
        self.model, self.lib, self.config = model, lib, c
        if c.n_heads // c.n_kv_heads > native_cpu.PagedDecode.MAX_GROUP:
            raise Unsupported("more query heads per KV head than the attention kernel takes")
        self.fused, self.why_phased, self.fused_max_rows = fused, "asked for", 0
        if fused:
            try:
                self._describe(pool, projections=True)
                self.fused_max_rows = self._native_rows()
            except Unsupported as e:
                self.fused, self.why_phased = False, str(e)
        # phased: the whole way, or above fused_max_rows when bf16 linears are fused (our
        # bf16 kernel beats torch's only at a few rows), or for steps carrying prefill above
        # the fused bound; the descriptors serve both ways
        if self.fused and not self.dense:
            self.max_rows = self.fused_max_rows
            self.shared_max_rows = min(self.max_rows, FUSED_SHARED_MAX_ROWS)
        else:
            self.max_rows, self.shared_max_rows = PHASED_MAX_ROWS, PHASED_SHARED_MAX_ROWS
        self.mixed_max_rows = PHASED_MIXED_MAX_TOKENS
        if not self.fused:
            self._describe(pool, projections=False)
        self.ff = c.d_ff  # the SwiGLU's inner width, CoLA or not
        self.width = max(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, self.ff)
        self._rows = torch.empty(len(ROWS), 0, dtype=torch.bfloat16)  # grown on demand

    @classmethod
    def build(cls, model: nn.Module, pool: KVCachePool) -> NativeDecodeStep | None:
        lib = native_cpu.library()
        why = None
        if os.environ.get(DISABLE_ENV, "1") == "0":
            why = f"{DISABLE_ENV}=0"
        elif lib is None:
            why = "the native CPU kernels are off"
        elif pool.device.type != "cpu" or pool.k.dtype != torch.bfloat16:
            why = "the KV cache is not bf16 on CPU"
        elif not isinstance(model, FANformer) or model.embed.weight.dtype != torch.bfloat16:
            why = "the model is not a bf16 FANformer"
        else:
            try:
                step = cls(model, pool, lib)
            except Unsupported as e:
                why = str(e)
            else:
                log.info("native decode step: %s", step.describe())
                return step
        log.info("native decode step off (%s): decode steps run the eager model", why)
        return None

    def describe(self) -> str:
        """How steps run, for the log."""
        if not self.fused:
            return f"phased (torch runs the projections: {self.why_phased})"
        if not self.dense:
            return "fused (one C call a step)"
        return (f"fused up to {self.fused_max_rows} rows (bf16 linears in C), phased up to "
                f"{self.max_rows}")

    # ---- descriptors, built once ----
    def _describe(self, pool: KVCachePool, projections: bool) -> None:
        c = self.config
        self._keep: list[torch.Tensor] = []  # every tensor a descriptor points into
        self._quantized: list[QuantLinear] = []
        self.dense = False  # whether a projection is a bf16 linear (the C file's own kernel)
        self.layers = (_Layer * c.n_layers)()
        widths = [c.d_model]
        for i, block in enumerate(self.model.blocks):
            self.layers[i] = self._layer(block, pool, i, widths if projections else None)
        self.max_width = max(widths)

    def _bf16(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().to(torch.bfloat16).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, module: nn.Module, widths: list[int]) -> _Linear:
        if type(module) in (nn.Linear, CPULinear):
            return self._dense(module, widths)
        if not isinstance(module, QuantLinear):
            raise Unsupported(f"a {type(module).__name__} projection is not quantized")
        kernel = module._kernel("weight-only")
        if not isinstance(kernel, native_cpu.NativeKernel):
            raise Unsupported(f"a {type(module).__name__} has no native kernel here")
        if kernel.bits == 8 and self.lib.isa != "avx512":
            raise Unsupported("8-bit layers need the AVX-512 build")  # AVX2 has no 8-bit path
        perm = None
        if kernel.perm is not None:
            perm = kernel.perm.to(torch.int64).contiguous()
            self._keep.append(perm)
        in_scale = getattr(module, "input_scale", None)
        self._keep += [kernel.packed, kernel.scale, kernel.minus_zs]
        self._quantized.append(module)
        widths += [module.in_features, module.out_features]
        return _Linear(kernel.packed.data_ptr(), kernel.scale.data_ptr(),
                       kernel.minus_zs.data_ptr(), self._bf16(module.bias),
                       perm.data_ptr() if perm is not None else None, self._bf16(in_scale),
                       module.in_features, kernel.n, kernel.scale.shape[1], kernel.group_size,
                       kernel.bits)

    def _dense(self, module: nn.Linear, widths: list[int]) -> _Linear:
        """A bf16 nn.Linear: its own weight, read in place by the C file's bf16 linear."""
        weight = module.weight.detach()
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            raise Unsupported("a linear's weight is not contiguous bf16")
        if module.in_features % 16:
            raise Unsupported("a bf16 linear's input width is not a multiple of 16")
        self._keep.append(weight)
        self.dense = True
        widths += [module.in_features, module.out_features]
        return _Linear(weight.data_ptr(), None, None, self._bf16(module.bias), None, None,
                       module.in_features, module.out_features, module.out_features,
                       module.in_features, 16)

    def _proj(self, module: nn.Module, widths: list[int]) -> _Proj:
        if isinstance(module, CoLALinear):
            return _Proj(self._linear(module.a, widths), self._linear(module.b, widths), 1)
        return _Proj(self._linear(module, widths), _Linear(), 0)

    def _layer(self, block: nn.Module, pool: KVCachePool, i: int,
               widths: list[int] | None) -> _Layer:
        """The block's descriptor; its projections only when `widths` is given (fused)."""
        attn, ffn = block.attn, block.ffn
        norm = lambda m: self._bf16(m.weight) if m is not None else None  # noqa: E731
        gate = lambda g: self._bf16(torch.sigmoid(g)) if g is not None else None  # noqa: E731
        layer = _Layer()
        if attn.fan is not None:
            layer.fan_periodic = attn.fan.periodic_dim
            if widths is not None:
                layer.fan = self._proj(attn.fan.proj, widths)
        if widths is not None:
            layer.qkv, layer.o = self._proj(attn.qkv, widths), self._proj(attn.o, widths)
            layer.gate, layer.up = self._proj(ffn.gate, widths), self._proj(ffn.up, widths)
            layer.down = self._proj(ffn.down, widths)
        layer.attn_norm, layer.ffn_norm = norm(block.attn_norm), norm(block.ffn_norm)
        layer.q_norm, layer.k_norm = norm(attn.q_norm), norm(attn.k_norm)
        layer.v_norm = norm(attn.v_norm)
        # sigmoid(gate).to(bf16) once: what Block._gated computes every step
        layer.attn_gate, layer.ffn_gate = gate(block.attn_gate), gate(block.ffn_gate)
        layer.kc, layer.vc = pool.k[i].data_ptr(), pool.v[i].data_ptr()
        layer.prenorm_ffn = int(block.prenorm_ffn)
        return layer

    @staticmethod
    def dense_fused_max_rows() -> int:
        """DENSE_FUSED_MAX_ROWS for this CPU."""
        return DENSE_FUSED_MAX_ROWS["amx" if "amx_bf16" in native_cpu.cpu_flags() else "no amx"]

    def _native_rows(self) -> int:
        """The most rows (up to FUSED_MAX_ROWS, DENSE_FUSED_MAX_ROWS with bf16 linears) at
        which every quantized layer's own policy runs its native kernel: the fused step
        computes what the eager layers would only there. Asked once here, not per step (the
        policy does not change while serving)."""
        most = self.dense_fused_max_rows() if self.dense else FUSED_MAX_ROWS
        for rows in range(most, 0, -1):
            if all(m.kernel_name(rows) == "weight-only" for m in self._quantized):
                return rows  # the policy is monotone in the row count
        return 0  # a layer runs w8a8 even at one row: no step takes this path

    # ---- per step ----
    def takes(self, segments: list[Segment], block_size: int) -> bool:
        """Whether a step of these segments runs here, each token a row: at most `max_rows`
        one-token rows (decode), or `mixed_max_rows` tokens when prefill chunks come along
        whose tokens attend to PREFILL_MAX_MEAN_KEYS positions or fewer on average;
        and more than `shared_max_rows` only if no decode rows share a prefix (the cascade
        rule of server/kv_cache.py `shared_prefix`)."""
        rows = sum(s.length for s in segments)
        most = self.max_rows if rows == len(segments) else self.mixed_max_rows
        if not 0 < rows <= most:
            return False
        chunks = [s for s in segments if s.length > 1]
        keys = sum(s.length * s.start + s.length * (s.length + 1) // 2 for s in chunks)
        if keys > PREFILL_MAX_MEAN_KEYS * sum(s.length for s in chunks):
            return False  # long rows: the eager step's flash attention over each chunk
        decode = [s for s in segments if s.length == 1]
        return rows <= self.shared_max_rows or not decode or \
            shared_prefix(decode, block_size, native=True) is None

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention: StepAttention) -> torch.Tensor:
        """input_ids (R,) of a step's R tokens, and that step's `StepAttention` built with
        every token a row (its `native` holds the rows' checked block tables and lengths)
        -> the final-normed hidden states (R, d), bf16."""
        c, paged = self.config, attention.native
        rows = input_ids.shape[0]
        if paged is None or attention.n_dec != rows or attention.chunks or \
                rows > max(self.max_rows, self.mixed_max_rows):
            raise ValueError("NativeDecodeStep: the step's attention must be planned with "
                             f"every token a row, at most {self.mixed_max_rows} of them")
        x = self.model.embed(input_ids).contiguous()  # (R, d) bf16, updated in place
        positions = attention.positions[0]  # (R,)
        rope = self.model.rope.at(positions[None], torch.bfloat16)  # (1, R, 1, hd/2) each
        cos, sin = rope.cos.reshape(rows, -1).contiguous(), rope.sin.reshape(rows, -1).contiguous()
        pool = attention.pool
        step = _Step(rows, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers,
                     pool.num_blocks, pool.block_size, paged.tables.shape[1],
                     self.max_width, c.norm_eps, c.head_dim ** -0.5,
                     cos.data_ptr(), sin.data_ptr(), attention.write_index.data_ptr(),
                     paged.tables.data_ptr(), paged.lengths.data_ptr())
        if self.fused and rows <= self.fused_max_rows:
            rc = self.lib.fanformer_decode_step(ctypes.addressof(self.layers),
                                                ctypes.byref(step), x.data_ptr(),
                                                torch.get_num_threads())
        else:
            rc = self._phased(x, step)
        if rc:
            raise MemoryError("the native decode step could not allocate its workspace")
        return self.model.norm(x)  # (R, d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on a native step's rows h (R, d): a bf16 head on the C file's bf16
        linear where the blocks' bf16 linears ran there (the step fused: no wake-up of a
        sleeping worker for torch's GEMV, and a faster GEMV), else the model's own head."""
        head = self.model.lm_head
        if self.fused and self.dense and h.shape[0] <= self.fused_max_rows and \
                type(head) in (nn.Linear, CPULinear) and head.weight.dtype == torch.bfloat16 \
                and head.in_features % 16 == 0 and head.weight.is_contiguous():
            return native_cpu.bf16_linear(h.contiguous(), head.weight, head.bias, lib=self.lib)
        return head(h)

    def _phased(self, x: torch.Tensor, step: _Step) -> int:
        """The blocks with torch's projections between the C phases; x (R, d) in place."""
        c, rows = self.config, step.R
        if self._rows.shape[1] < rows * self.width:  # (len(ROWS), rows * width) bf16
            self._rows = torch.empty(len(ROWS), rows * self.width, dtype=torch.bfloat16)
        buf = dict(zip(ROWS, self._rows))
        d, heads, ff = c.d_model, c.n_heads * c.head_dim, self.ff
        widths = {"h": d, "xf": d, "qkv": heads + 2 * c.n_kv_heads * c.head_dim,
                  "attn": heads, "a": d, "n": d, "g": ff, "u": ff, "f": d}
        v = {name: buf[name][: rows * w].view(rows, w) for name, w in widths.items()}
        ptrs = _Rows(*(buf[name].data_ptr() for name in ROWS))
        threads = torch.get_num_threads()
        args = (ctypes.byref(step), x.data_ptr(), ctypes.byref(ptrs), ff,
                threads if rows >= PHASED_TEAM_MIN_ROWS else 1)  # the elementwise phases
        run = self.lib.fanformer_block_phase
        for block, layer in zip(self.model.blocks, self.layers):
            attn, ffn, desc = block.attn, block.ffn, ctypes.byref(layer)
            h = x
            if block.attn_norm is not None:
                run(ATTN_NORM, desc, *args)
                h = v["h"]
            if attn.fan is not None:
                fan = buf["a"][: rows * (d - attn.fan.periodic_dim)].view(rows, -1)
                fan.copy_(attn.fan.proj(h))  # (R, d - p): P | G
                run(FAN_FEATURES, desc, *args)
                h = v["xf"]
            _into(attn.qkv, h, v["qkv"])
            if run(ATTENTION, desc, *args[:-1], threads):
                return -1
            _into(attn.o, v["attn"], v["a"])
            run(ATTN_RESIDUAL, desc, *args)
            _into(ffn.gate, v["n"], v["g"])
            _into(ffn.up, v["n"], v["u"])
            run(SWIGLU, desc, *args)
            _into(ffn.down, v["g"], v["f"])
            run(FFN_RESIDUAL, desc, *args)
        return 0


def _into(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """out <- module(x) with the module's own bits (written in place where it can be)."""
    if isinstance(module, (CPULinear, QuantLinear)):
        module.forward_into(x, out)
    else:
        out.copy_(module(x))
