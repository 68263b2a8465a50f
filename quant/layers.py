"""Drop-in quantized replacements for `nn.Linear`, with fast CPU kernels chosen by batch size.

Each module stores the on-disk tensors of its format as buffers (so `state_dict()` is the
checkpoint) and builds its kernel tensors lazily on the first forward, never persisting
them (the aten int4 layout is opaque and machine-specific). On CPU (measured in
docs/BENCHMARKS.md and ../shared/research/quant.md):

  rows <= SMALL_BATCH_ROWS (decode): PyTorch's weight-only kernels with bf16 activations,
      `_weight_int4pack_mm_for_cpu` (4-bit, groups of 32..256) or `_weight_int8pack_mm`;
      they run 2-3x faster than bf16 `F.linear` at one row but lose above ~4 rows.
  more rows (prefill, batched decode): fbgemm's dynamic int8 `quantized::linear_dynamic`
      (per-tensor activation quantization, int8 weights), faster than bf16 at every size
      measured; 4-bit layers requantize their dequantized weight to int8 for it, lazily.
  anything else (3/8-bit GPTQ groups, odd group sizes, CUDA): the readable reference,
      dequantize then `F.linear`; `dequantize()` is also what the tests compare against.

The modules know their tensors and kernels; they know nothing about models or files.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from quant.packing import unpack_awq, unpack_gptq

SMALL_BATCH_ROWS = 4  # at or below: aten weight-only kernels; above: fbgemm dynamic int8
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
USE_DYNAMIC_INT8 = True  # the benches flip this to measure the aten kernels alone


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class QuantLinear(nn.Module):
    """Common forward: pick a kernel by the number of rows, add the bias, keep x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", _empty(out_features, torch.float32, device))
        else:
            self.bias = None
        self._kernels: dict[str, object] = {}

    # subclasses provide the reference dequantization and the small-batch kernel
    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32 that this layer computes with."""
        raise NotImplementedError

    def stored_weight(self) -> torch.Tensor:
        """The weight (N, K) the kernels multiply `_prepare_input(x)` by; differs from
        `dequantize()` only when the layer has an explicit input scale (AWQ)."""
        return self.dequantize()

    def _small_kernel(self):
        """A callable x_bf16 (M, K) -> (M, N), or None when no fast kernel fits."""
        return None

    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 weight (N, K) and per-row fp32 scales for the fbgemm path."""
        w = self.stored_weight()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # AWQ layers with an explicit input scale multiply it in here

    # ---- kernels, built lazily and dropped whenever the buffers change ----
    def _kernel(self, name: str):
        if name not in self._kernels:
            if name == "small":
                self._kernels[name] = self._small_kernel()
            elif name == "dynamic":
                w8, scale = self._int8_weight()
                zeros = torch.zeros(w8.shape[0], dtype=torch.long)
                with warnings.catch_warnings():  # quantized tensors are deprecated; the op is not
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch._make_per_channel_quantized_tensor(w8, scale.double(), zeros, 0)
                    self._kernels[name] = torch.ops.quantized.linear_prepack(qw, None)
            else:  # the reference weight, cached in bf16 (speed of bf16, not smaller)
                self._kernels[name] = self.stored_weight().to(torch.bfloat16)
        return self._kernels[name]

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernels = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Follow device moves but never dtype casts: `model.to(torch.bfloat16)` (what the
        engine does) must not round fp16 scales or fp32 absmax to bf16."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if any(self._buffers[name] is not old for name, old in before.items()):
            self._kernels = {}  # moved: rebuild; a no-op `.to()` keeps the built kernels
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self._prepare_input(x.reshape(-1, self.in_features))  # (M, K)
        if x.device.type != "cpu":
            y = F.linear(x2, self.stored_weight().to(x2.dtype))
        elif x2.shape[0] > SMALL_BATCH_ROWS and USE_DYNAMIC_INT8:
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._kernel("dynamic"), True)
        else:
            small, xb = self._kernel("small"), x2.to(torch.bfloat16)
            y = small(xb) if small is not None else F.linear(xb, self._kernel("dense"))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8: `weight` int8 (N, K), `SCB` fp32 (N,) = absmax.

    The key names and meaning are bitsandbytes' (`SCB` is the row absmax; the scale is
    SCB / 127), so `bnb.nn.Linear8bitLt` can load these tensors too.
    """

    def __init__(self, in_features, out_features, bias=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", _empty((out_features, in_features), torch.int8, device))
        self.register_buffer("SCB", _empty(out_features, torch.float32, device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        n, k = weight.shape
        layer = cls(k, n, bias is not None, device="cpu")
        absmax = weight.detach().float().abs().amax(dim=1).clamp(min=1e-8)
        layer.weight = torch.round(weight.detach().float() * (127 / absmax[:, None])).to(
            torch.int8)
        layer.SCB = absmax
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantize(self):
        return self.weight.float() * (self.SCB / 127)[:, None]

    def _int8_weight(self):
        return self.weight, self.SCB / 127

    def _small_kernel(self):
        if self.weight.data_ptr() % 64 or not self.weight.is_contiguous():
            # safetensors can hand out tensors at 8-byte offsets; the aten int8 kernel
            # segfaults on those (measured), so give it its own aligned copy once
            self.weight = self.weight.contiguous().clone()
        scales = (self.SCB / 127).to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, self.weight, scales)


class _GroupedLinear(QuantLinear):
    """Shared runtime of the packed 4-bit formats: unpack to codes, repack for aten int4."""

    bits = 4
    group_size = 128

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (K, N), zeros (G, N), scales (G, N) fp32, g_idx (K,) long."""
        raise NotImplementedError

    def dequantize(self):
        codes, zeros, scales, g = self.unpacked()
        return ((codes - zeros[g]).float() * scales[g]).T.contiguous()  # (N, K)

    def _small_kernel(self):
        gs, k, n = self.group_size, self.in_features, self.out_features
        if self.bits != 4 or gs not in INT4_GROUP_SIZES or k % gs:
            return None
        codes, zeros, scales, g = self.unpacked()
        perm = None
        if not torch.equal(g, torch.arange(k) // gs):  # act-order: make groups contiguous
            perm = torch.argsort(g, stable=True)
            codes, g = codes[perm], g[perm]
            if not torch.equal(g, torch.arange(k) // gs):
                return None  # groups of unequal size: no aten layout for that
        pad = -n % 16  # the int4 kernel needs N to be a multiple of 16
        codes = F.pad(codes.T, (0, 0, 0, pad)).contiguous()  # (N + pad, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # tinygemm computes (q - 8) * scale + offset; ours is (q - zero) * scale
        offset = (8 - zeros.float()) * scales
        scale_zero = torch.stack([scales, offset], dim=-1)  # (G, N, 2)
        scale_zero = F.pad(scale_zero, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()

        def run(x: torch.Tensor) -> torch.Tensor:
            if perm is not None:
                x = x[:, perm]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, scale_zero)
            return y[:, :n]

        return run


class GPTQLinear(_GroupedLinear):
    """GPTQ v1 tensors (`qweight`, `qzeros`, `scales`, `g_idx`); gptq and rtn write these."""

    def __init__(self, in_features, out_features, bias=False, bits=4, group_size=128,
                 device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.bits, self.group_size = bits, group_size
        groups = -(-in_features // group_size)
        per_word = 32 // bits if 32 % bits == 0 else 32
        zero_words = -(-out_features // per_word) * per_word * bits // 32
        self.register_buffer("qweight", _empty((in_features * bits // 32, out_features),
                                               torch.int32, device))
        self.register_buffer("qzeros", _empty((groups, zero_words), torch.int32, device))
        self.register_buffer("scales", _empty((groups, out_features), torch.float16, device))
        self.register_buffer("g_idx", _empty(in_features, torch.int32, device))

    def unpacked(self):
        codes, zeros = unpack_gptq(self.qweight, self.qzeros, self.bits, self.out_features)
        return codes, zeros, self.scales.float(), self.g_idx.long()

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"


class AWQLinear(_GroupedLinear):
    """AutoAWQ GEMM tensors (`qweight`, `qzeros`, `scales`), 4-bit; plus `input_scale` (K,)
    when AWQ's per-channel scale could not be folded into the op before this layer: the
    layer then computes Q(W * s) (x / s), and `input_scale` holds 1 / s."""

    def __init__(self, in_features, out_features, bias=False, group_size=128,
                 input_scale=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups, words = in_features // group_size, -(-out_features // 8)
        self.register_buffer("qweight", _empty((in_features, words), torch.int32, device))
        self.register_buffer("qzeros", _empty((groups, words), torch.int32, device))
        self.register_buffer("scales", _empty((groups, out_features), torch.float16, device))
        if input_scale:
            self.register_buffer("input_scale", _empty(in_features, torch.float32, device))
        else:
            self.input_scale = None

    def unpacked(self):
        codes, zeros = unpack_awq(self.qweight, self.qzeros, self.out_features)
        g = torch.arange(self.in_features) // self.group_size
        return codes, zeros, self.scales.float(), g

    def stored_weight(self):
        return super().dequantize()  # Q(W * s), applied to x / s

    def dequantize(self):
        w = self.stored_weight()
        return w if self.input_scale is None else w * self.input_scale.float()

    def _prepare_input(self, x):
        return x if self.input_scale is None else x * self.input_scale.to(x.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"
