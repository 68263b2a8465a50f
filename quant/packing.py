"""Bit packing of quantized codes into the GPTQ (v1) and AutoAWQ (GEMM) on-disk layouts.

These are the de-facto layouts of the GPTQ/AWQ ecosystem (AutoGPTQ, GPTQModel, vLLM,
AutoAWQ), so other tools can read the tensors we write (see docs/QUANTIZATION.md):

GPTQ v1 (bits in {2, 3, 4, 8}), for a linear with K inputs, N outputs, G = ceil(K / group):
  qweight int32 (K * bits / 32, N): the codes of one output column, packed along the input
      dimension as one little-endian bit stream (value k at bit k * bits, least-significant
      first; 3-bit values straddle 32-bit words exactly as AutoGPTQ's packer does).
  qzeros  int32 (G, ceil(N * bits / 32)): zero points packed along the output dimension in
      the same order, stored MINUS ONE (the historical v1 offset; readers add 1 back).
  scales  fp16  (G, N);  g_idx int32 (K,): the group of each input column.
  dequant: W[k, n] = scales[g_idx[k], n] * (code[k, n] - (stored_zero[g_idx[k], n] + 1)).

AutoAWQ GEMM (4-bit only):
  qweight int32 (K, N / 8), packed along the OUTPUT dimension, nibble i of word w holding
      column 8 w + AWQ_ORDER[i];  qzeros int32 (G, N / 8), same order, stored as-is;
  scales fp16 (G, N);  dequant: W[k, n] = scales[k // group, n] * (code - zero).

When N is not a multiple of the values per word (the FAN projection's 653 outputs), the
packed output dimension is padded with zero codes; `unpack_*` takes N to cut them off.
This module knows only integers and bit layouts: no rounding, no models, no kernels.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i]
GPTQ_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits must be one of {GPTQ_BITS}, got {bits}")


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (L, M) along dim 0 into int32 words (L * bits / 32, M), LSB first.

    The L values of each column form one little-endian bit stream cut into 32-bit words,
    which is AutoGPTQ's order for 2/4/8 bits and its straddling order for 3 bits.
    """
    _check_bits(bits)
    length, width = codes.shape
    if length * bits % 32:
        raise ValueError(f"cannot pack {length} {bits}-bit values into whole 32-bit words")
    c = codes.to(torch.int64)  # packing is offline: int64 keeps the shifts sign-free
    if int(c.min()) < 0 or int(c.max()) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if 32 % bits == 0:  # whole values per word: shift and add (fast)
        shifts = _arange(0, 32, bits, like=c)[None, :, None]
        words = (c.reshape(length * bits // 32, 32 // bits, width) << shifts).sum(1)
        return _to_int32(words)
    stream = (c[:, None, :] >> _arange(0, bits, 1, like=c)[None, :, None]) & 1  # (L, bits, M)
    stream = stream.reshape(length * bits // 32, 32, width)  # (words, 32, M)
    words = (stream << _arange(0, 32, 1, like=c)[None, :, None]).sum(1)  # (words, M)
    return _to_int32(words)


def unpack_stream(words: torch.Tensor, bits: int, length: int | None = None) -> torch.Tensor:
    """Inverse of `pack_stream`: int32 words (W, M) -> int32 codes (W * 32 / bits, M).

    Runs in int32 on the words' device: an arithmetic right shift drags the sign bit
    along, but the mask keeps only the field's own bits, so no int64 copy is needed.
    """
    _check_bits(bits)
    n_words, width = words.shape
    w = words.to(torch.int32)
    if 32 % bits == 0:  # whole values per word: shift and mask, no bit expansion (fast)
        shifts = _arange(0, 32, bits, like=w)[None, :, None]
        codes = (w[:, None, :] >> shifts) & ((1 << bits) - 1)  # (W, 32 / bits, M)
        return codes.reshape(n_words * 32 // bits, width)[:length]
    stream = (w[:, None, :] >> _arange(0, 32, 1, like=w)[None, :, None]) & 1  # (W, 32, M)
    stream = stream.reshape(n_words * 32 // bits, bits, width)  # (L, bits, M)
    codes = (stream << _arange(0, bits, 1, like=w)[None, :, None]).sum(1, dtype=torch.int32)
    return codes[:length]


def _arange(start: int, end: int, step: int, like: torch.Tensor) -> torch.Tensor:
    """Bit positions as a tensor of `like`'s dtype, on `like`'s device."""
    return torch.arange(start, end, step, dtype=like.dtype, device=like.device)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pad_columns(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


# ---- GPTQ v1 ----
def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """codes (K, N) and zeros (G, N) as unsigned integers, scales (G, N), g_idx (K,) ->
    the GPTQ v1 tensors. Zeros must be >= 1: v1 stores zero - 1 in an unsigned field."""
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (it stores zero - 1)")
    per_word = 32 // bits if 32 % bits == 0 else 32
    qzeros = pack_stream(_pad_columns(zeros.to(torch.int64) - 1, per_word).T, bits).T
    return {"qweight": pack_stream(codes, bits), "qzeros": qzeros.contiguous(),
            "scales": scales.to(torch.float16).contiguous(), "g_idx": g_idx.to(torch.int32)}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int,
                out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ v1 qweight/qzeros -> codes (K, N) and true zero points (G, N), int32."""
    codes = unpack_stream(qweight, bits)
    zeros = unpack_stream(qzeros.T.contiguous(), bits).T[:, :out_features] + 1
    return codes, zeros.contiguous()


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int,
                    out_features: int) -> torch.Tensor:
    """The fp32 weight (N, K) that GPTQ v1 tensors stand for (the reference every kernel
    is tested against)."""
    codes, zeros = unpack_gptq(tensors["qweight"], tensors["qzeros"], bits, out_features)
    g = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return ((codes - zeros[g]).float() * scales[g]).T.contiguous()  # (N, K)


# ---- AutoAWQ GEMM ----
def pack_awq(codes: torch.Tensor, zeros: torch.Tensor,
             scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """codes (K, N), zeros (G, N), scales (G, N) -> AutoAWQ GEMM qweight/qzeros/scales."""
    return {"qweight": _pack_awq_words(codes), "qzeros": _pack_awq_words(zeros),
            "scales": scales.to(torch.float16).contiguous()}


def _pack_awq_words(values: torch.Tensor) -> torch.Tensor:
    v = _pad_columns(values.to(torch.int64), 8)
    if int(v.min()) < 0 or int(v.max()) > 15:
        raise ValueError("AWQ GEMM packs 4-bit values: they must lie in [0, 15]")
    rows, width = v.shape
    v = v.reshape(rows, width // 8, 8)[:, :, list(AWQ_ORDER)]  # nibble i <- column ORDER[i]
    return _to_int32((v << _arange(0, 32, 4, like=v)).sum(-1))  # (rows, N / 8)


def _unpack_awq_words(words: torch.Tensor, width: int) -> torch.Tensor:
    w = words.to(torch.int32)
    # column j of a word sits in nibble AWQ_ORDER.index(j): shift straight to it
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32,
                          device=w.device)
    values = (w[..., None] >> shifts) & 0xF  # (R, W, 8): column 8 w + j at [.., w, j]
    return values.reshape(words.shape[0], -1)[:, :width].contiguous()  # (R, N)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor,
               out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM qweight/qzeros -> codes (K, N) and zero points (G, N), int32."""
    return _unpack_awq_words(qweight, out_features), _unpack_awq_words(qzeros, out_features)


def dequantize_awq(tensors: dict[str, torch.Tensor], group_size: int,
                   out_features: int) -> torch.Tensor:
    """The fp32 weight (N, K) that AWQ GEMM tensors stand for (without any input scale)."""
    codes, zeros = unpack_awq(tensors["qweight"], tensors["qzeros"], out_features)
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    return ((codes - zeros[g]).float() * tensors["scales"].float()[g]).T.contiguous()
