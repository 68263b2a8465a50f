"""Decode attention (server/kv_cache.py): cascade against the per-row path (native where
it runs, else gather), and the native kernel against the gather path it replaces; shared
and unshared rows, contiguous and scattered prefix blocks, fp32 and bf16, GQA; the merge
maths; which rows and blocks form the shared prefix."""

from __future__ import annotations

import random

import pytest
import torch

from fanformer.config import ModelConfig
from quant import native_cpu
from server import kv_cache
from server.kv_cache import KVCachePool, Segment, StepAttention, merge_attention, shared_prefix

BS = 16


@pytest.fixture
def cascade_on_short_prefixes(monkeypatch):
    """Cascade decode from 4 shared blocks even where the native kernel runs (which takes
    prefixes shorter than CASCADE_NATIVE_MIN_TOKENS): the cascade tests' prefixes are short."""
    monkeypatch.setattr(kv_cache, "CASCADE_NATIVE_MIN_TOKENS", kv_cache.CASCADE_MIN_BLOCKS * BS)


def make_pool(n_heads: int, n_kv: int, dtype: torch.dtype, num_blocks: int = 96) -> KVCachePool:
    config = ModelConfig(n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, d_model=16 * n_heads)
    pool = KVCachePool(config, num_blocks, BS, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    pool.k.copy_(torch.randn(pool.k.shape, generator=gen))
    pool.v.copy_(torch.randn(pool.v.shape, generator=gen))
    return pool


def segments_for(lengths: list[int], prefix_blocks: list[int], shared: list[bool],
                 free: list[int]) -> list[Segment]:
    """One decode segment per length (its token at position length - 1): rows marked shared
    start with `prefix_blocks`, the rest of every table comes from `free`."""
    segs = []
    for n, s in zip(lengths, shared):
        need = -(-n // BS)
        own = prefix_blocks[:] if s else []
        own += [free.pop() for _ in range(need - len(own))]
        segs.append(Segment(own, n - 1, 1))
    return segs


def attend(pool, segments, cascade, q, k, v):
    att = StepAttention(pool, segments, cascade=cascade)
    saved = pool.k.clone(), pool.v.clone()  # attend writes the step's k/v: same for both
    out = att.attend(0, None, q, k, v)
    pool.k.copy_(saved[0])
    pool.v.copy_(saved[1])
    return att, out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5),
                                       # bf16: both paths round their output (|x| < 2
                                       # here, one ulp <= 2**-7) after summing in other
                                       # orders; measured <= 1 ulp apart, 2 allowed
                                       (torch.bfloat16, 2 * 2**-7)])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_cascade_decode_equals_the_gather_path(dtype, tol, contiguous, heads,
                                               cascade_on_short_prefixes):
    rng = random.Random(1)
    pool = make_pool(*heads, dtype)
    blocks = list(range(pool.num_blocks))
    prefix = blocks[8:14] if contiguous else [40, 3, 77, 12, 50, 9]  # 6 blocks, 96 tokens
    free = [b for b in blocks if b not in prefix]
    rng.shuffle(free)
    lengths = [96 + 1, 130, 100, 70, 97 + 40, 20, 180]
    shared = [True, True, False, False, True, False, True]
    segs = segments_for(lengths, prefix, shared, free)
    h, n = heads[0], len(segs)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, h, n, 16, generator=gen).to(dtype)
    k = torch.randn(1, heads[1], n, 16, generator=gen).to(dtype)
    v = torch.randn(1, heads[1], n, 16, generator=gen).to(dtype)
    att, got = attend(pool, segs, True, q, k, v)
    assert att.prefix == ([0, 1, 4, 6], prefix)
    assert isinstance(att.prefix_blocks, slice) == contiguous
    _, want = attend(pool, segs, False, q, k, v)
    assert got.shape == want.shape == (1, h, n, 16) and got.dtype == dtype
    assert want.abs().max() < 2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


def _rows(dtype, heads, lengths, seed):
    rng = random.Random(seed)
    pool = make_pool(*heads, dtype)
    free = list(range(pool.num_blocks))
    rng.shuffle(free)
    segs = segments_for(lengths, [], [False] * len(lengths), free)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, hh, len(segs), 16, generator=gen).to(dtype)
               for hh in (heads[0], heads[1], heads[1]))
    return pool, segs, q, k, v


needs_native = pytest.mark.skipif(native_cpu.library() is None,
                                  reason="the native kernels do not run here")


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 * 2**-7)])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (8, 1)])
def test_native_decode_equals_the_gather_path(dtype, tol, heads, monkeypatch):
    """Each row read in place through its block table (quant/native_cpu.c) against the
    gather + masked SDPA path it replaces on CPU; rows of 1 token to several blocks."""
    pool, segs, q, k, v = _rows(dtype, heads, [1, 16, 17, 130, 64, 200, 33], seed=4)
    att, got = attend(pool, segs, False, q, k, v)
    assert att.native is not None
    with monkeypatch.context() as m:
        m.setattr(native_cpu, "library", lambda: None)
        dense_att, want = attend(pool, segs, False, q, k, v)
    assert dense_att.native is None
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_rows_never_mix(dtype):
    """A row's attention is bitwise the same alone and among other rows of other lengths."""
    pool, segs, q, k, v = _rows(dtype, (4, 2), [5, 150, 40, 90, 1], seed=5)
    _, together = attend(pool, segs, False, q, k, v)
    for i, seg in enumerate(segs):
        sl = slice(i, i + 1)
        _, alone = attend(pool, [seg], False, q[:, :, sl], k[:, :, sl], v[:, :, sl])
        assert torch.equal(alone, together[:, :, sl]), i


def test_cascade_decode_with_prefill_chunks_and_a_prefix_ending_at_a_row_token(
        cascade_on_short_prefixes):
    """Decode rows then a prefill chunk in one step; a shared row whose token is the first of
    the block after the prefix (its own part is that one token)."""
    pool = make_pool(4, 2, torch.float32)
    prefix = [20, 21, 22, 23]
    segs = [Segment(prefix + [30], 64, 1), Segment(prefix + [31, 32], 90, 1),
            Segment(prefix + [33], 66, 1), Segment([40, 41], 10, 7)]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, hh, 10, 16, generator=gen) for hh in (4, 2, 2))
    att, got = attend(pool, segs, True, q, k, v)
    assert att.prefix == ([0, 1, 2], prefix)
    _, want = attend(pool, segs, False, q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_where_the_native_kernel_runs_only_a_long_shared_prefix_takes_cascade():
    """The native kernel beats cascade up to a shared prefix of CASCADE_NATIVE_MIN_TOKENS
    (docs/ENGINE.md): below it the rows read their blocks in place, from it cascade reads the
    prefix once; without the kernel, cascade from CASCADE_MIN_BLOCKS blocks as before."""
    need = -(-kv_cache.CASCADE_NATIVE_MIN_TOKENS // BS)  # blocks

    def rows(shared_blocks):  # 3 rows past a shared run of that many blocks
        lead = list(range(shared_blocks))
        return [Segment(lead + [1000 + i], shared_blocks * BS + i, 1) for i in range(3)]
    assert shared_prefix(rows(need - 1), BS, native=True) is None
    assert shared_prefix(rows(need), BS, native=True) == ([0, 1, 2], list(range(need)))
    assert shared_prefix(rows(kv_cache.CASCADE_MIN_BLOCKS), BS) is not None  # no kernel


def test_shared_prefix_picks_the_most_common_first_block_and_its_visible_common_run():
    seg = Segment
    rows = [seg([1, 2, 3, 4, 5, 6], 95, 1), seg([9, 8, 7, 6, 5], 70, 1),
            seg([1, 2, 3, 4, 5, 7], 90, 1), seg([1, 2, 3, 4, 5, 6, 11], 100, 1)]
    assert shared_prefix(rows, BS) == ([0, 2, 3], [1, 2, 3, 4, 5])
    # a row at position 64 sees blocks 0-3 whole and its own token in block 4
    assert shared_prefix(rows[:1] + [seg([1, 2, 3, 4, 5, 6], 64, 1)], BS) == ([0, 1],
                                                                              [1, 2, 3, 4])
    assert shared_prefix(rows[:1] + [seg([1, 2, 3, 4, 5, 6], 63, 1)], BS) is None  # 3 blocks
    assert shared_prefix(rows[:2], BS) is None  # no two rows share a first block
    assert shared_prefix([seg([1, 2, 3, 9, 5], 70, 1), rows[0]], BS) is None  # 3 in common


def test_merge_of_two_key_sets_equals_attention_over_both():
    """Split the keys in two, attend to each (out, lse), merge: attention over all of them,
    also with scores so large that exp(lse) overflows fp32."""
    gen = torch.Generator().manual_seed(4)
    for scale in (1.0, 60.0):
        q = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64) * scale
        k = torch.randn(3, 30, 8, generator=gen, dtype=torch.float64)
        v = torch.randn(3, 30, 8, generator=gen, dtype=torch.float64)
        scores = q @ k.transpose(1, 2)  # (3, 5, 30)
        want = torch.softmax(scores, -1) @ v

        (oa, la), (ob, lb) = ((torch.softmax(scores[..., sl], -1) @ v[:, sl],
                               torch.logsumexp(scores[..., sl], -1))
                              for sl in (slice(0, 11), slice(11, 30)))
        assert scale == 1.0 or torch.isinf(torch.exp(la.float())).any()
        got = merge_attention(oa.float(), la.float(), ob.float(), lb.float())
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
