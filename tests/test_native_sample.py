"""The sampler's first draw in C (quant/native_sample.c) against torch's
(server/sampling.py `_first_draw`): the same tokens, validity and nucleus misses, a row the
same alone and in a batch, on one thread or two, in every build this CPU runs."""

from __future__ import annotations

import pytest
import torch

from quant import native_cpu
from server.sampling import SamplingParams, _first_draw, _min_p_floor, _native_first_draw

KINDS = [dict(temperature=0.8, top_p=0.95), dict(temperature=1.3), dict(top_p=0.5),
         dict(temperature=0.7, min_p=0.05, top_p=0.9), dict(temperature=0.2, top_p=0.99)]


def draw_inputs(rows: int, vocab: int, dtype: torch.dtype, seed: int):
    """Logits (rows, vocab), a column slice of a wider tensor, flat to peaked rows; params
    of every kind; first uniforms."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 8
    logits = (torch.randn(rows, vocab + 5, generator=g) * scale).to(dtype)[:, :vocab]
    params = [SamplingParams(**KINDS[i % len(KINDS)]) for i in range(rows)]
    return logits, params, torch.rand(rows, generator=g)


def native(lib, logits, params, u, threads):
    tokens, status = native_cpu.sample_rows(
        logits, torch.tensor([p.temperature for p in params]), _min_p_floor(params, "cpu"),
        torch.tensor([p.top_p for p in params]), u, threads, lib=lib)
    return tokens, status != 0, status == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [5, 300, 4097])
def test_the_native_first_draw_is_torchs(native_build, dtype, vocab):
    """400 rows of every kind (a vocabulary that is not a multiple of the kernel's 8 lanes
    or 256-token chunks; NaN, +inf and all -inf rows), its own exp and sum order: torch's
    tokens, validity and misses."""
    logits, params, u = draw_inputs(400, vocab, dtype, seed=vocab)
    logits[3, 1] = float("nan")
    logits[4, 2] = float("inf")
    logits[5] = float("-inf")
    theirs = _first_draw(logits, params, u)
    lib = native_build
    for threads in (1, 2):
        ours = native(lib, logits, params, u, threads)
        assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
        assert torch.equal(ours[0][ours[1]], theirs[0][theirs[1]])  # (an invalid row's is moot)
    assert not ours[1][3:6].any() and int(ours[1].sum()) == 397
    assert 0 < int(ours[2].sum()) < 400  # some rows miss their nucleus, most do not
    for i in (0, 7, 399):  # alone == in the batch
        alone = native(lib, logits[i:i + 1], params[i:i + 1], u[i:i + 1], 1)
        assert int(alone[0][0]) == int(ours[0][i]) and bool(alone[2][0]) == bool(ours[2][i])


@pytest.mark.skipif(native_cpu.library() is None, reason="the native kernels do not run here")
def test_top_k_rows_take_torchs_top_k_then_the_native_draw():
    logits, _, u = draw_inputs(64, 1000, torch.bfloat16, seed=3)
    params = [SamplingParams(temperature=0.9, top_k=k, top_p=0.9) for k in (0, 1, 5, 50)] * 16
    ours, theirs = _native_first_draw(logits, params, u), _first_draw(logits, params, u)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_bad_inputs_are_refused_before_any_pointer_is_read():
    x = torch.zeros(2, 8)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="sample_rows"):
        native_cpu.sample_rows(x.T, ones, ones, ones, ones, 1)  # not unit column stride
    with pytest.raises(ValueError, match="sample_rows"):
        native_cpu.sample_rows(x, ones[:1], ones, ones, ones, 1)  # a short column
    with pytest.raises(ValueError, match="sample_rows"):
        native_cpu.sample_rows(x.double(), ones, ones, ones, ones, 1)
