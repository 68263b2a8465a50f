"""The native decode step (server/native_step.py, quant/native_step.c) against the eager
model it replaces: the same hidden states to bf16 rounding, fused (every projection on the
native kernel) and phased (torch's projections: bf16, nf4, or asked for), for every block
variant (FAN, CoLA, HybridNorm, gates; dense pre-norm); each row the same alone as in a
batch; the same greedy tokens through the engine; off where it cannot run."""

from __future__ import annotations

import pytest
import torch

from fanformer.checkpoint import save_checkpoint
from quant import load_any_checkpoint, native_cpu
from quant.cli import main
from server.engine import EngineConfig, LLMEngine
from server.kv_cache import CASCADE_NATIVE_MIN_TOKENS, KVCachePool, Segment, StepAttention
from server.native_step import (
    FUSED_MAX_ROWS,
    FUSED_SHARED_MAX_ROWS,
    PHASED_MAX_ROWS,
    PHASED_SHARED_MAX_ROWS,
    PREFILL_MAX_MEAN_KEYS,
    NativeDecodeStep,
)
from server.sampling import SamplingParams
from tests.conftest import make_model

pytestmark = pytest.mark.skipif(native_cpu.library() is None,
                                reason="the native CPU kernels do not run here")

FAST = ["--calib_samples", "4", "--calib_seq_len", "32", "--eval_tokens", "0", "--quiet"]
# preset (overrides), method (None: bf16 weights), flags, the step's way: "fused" (every
# projection quantized: fused at every row count it takes), "bf16" (bf16 linears: fused up
# to DENSE_FUSED_MAX_ROWS, phased above), "phased".
# cola_rank 32: CoLA's inner width must hold a quantization group.
CASES = {
    "fanformer rtn": ("test", dict(cola_rank=32), "rtn", ["--group_size", "32"], "fused"),
    "fanformer awq": ("test", dict(cola_rank=32), "awq", ["--group_size", "32"], "fused"),
    "dense gptq act-order": ("transformer-test", {}, "gptq",
                             ["--group_size", "32", "--desc_act", "--lm_head", "int8"], "fused"),
    "dense int8": ("transformer-test", {}, "int8", [], "fused"),
    "fanformer bf16": ("test", {}, None, [], "bf16"),
    "dense bf16": ("transformer-test", {}, None, [], "bf16"),
    "dense nf4": ("transformer-test", {}, "nf4", [], "phased"),
}
PROMPTS = [[5, 9, 14], [17, 42, 9, 3, 8, 1, 77, 23, 4], list(range(3, 30))]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tokenizer):
    """(bf16 model, tokenizer, its step's way)"""
    preset, overrides, method, flags, way = CASES[request.param]
    if method == "int8" and not native_cpu.full_build():
        pytest.skip("int8 layers run natively on the AVX-512 build only")
    model = make_model(preset, **overrides)
    if method is not None:
        src = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", model, tokenizer)
        out = tmp_path_factory.mktemp("q") / method
        assert main(["--method", method, "--checkpoint", str(src), "--output", str(out),
                     *FAST, *flags]) == 0
        model, _ = load_any_checkpoint(out)
    return model.to(torch.bfloat16).eval(), tokenizer, way


def prefilled(model, prompts, block_size=4):
    """A KV pool holding the prompts (eager prefill), the rows' tables reversed so that
    blocks are not in order: -> (pool, tables)."""
    pool = KVCachePool(model.config, 64, block_size, torch.bfloat16, "cpu")
    tables, free = [], list(range(63, -1, -1))
    for p in prompts:
        tables.append([free.pop() for _ in range(-(-(len(p) + 1) // block_size))][::-1])
    attention = StepAttention(pool, [Segment(t, 0, len(p)) for t, p in zip(tables, prompts)])
    with torch.inference_mode():
        model.hidden_states(torch.tensor([sum(prompts, [])]), attention.positions, attention)
    return pool, tables


def decode(step, model, pool, tables, prompts, rows, native):
    """One decode step of `rows` (indices into prompts): (len(rows), d) hidden states."""
    segments = [Segment(tables[r], len(prompts[r]), 1) for r in rows]
    attention = StepAttention(pool, segments, cascade=False)
    ids = torch.tensor([prompts[r][-1] for r in rows])
    if native:
        return step(ids, attention)
    with torch.inference_mode():
        return model.hidden_states(ids[None], attention.positions, attention)[0]


@pytest.mark.parametrize("phased", [False, True])
def test_matches_the_eager_model_to_bf16_rounding(case, phased):
    model, _, way = case
    pool, tables = prefilled(model, PROMPTS)
    step = NativeDecodeStep.build(model, pool)
    assert step is not None and step.fused == (way != "phased")
    assert step.max_rows >= len(PROMPTS) and step.fused_max_rows == \
        {"fused": FUSED_MAX_ROWS, "bf16": NativeDecodeStep.dense_fused_max_rows(),
         "phased": 0}[way]
    if phased:  # the phased way for every model, the fused ones too
        step = NativeDecodeStep(model, pool, native_cpu.library(), fused=False)
    rows = list(range(len(PROMPTS)))
    eager = decode(step, model, pool, tables, PROMPTS, rows, native=False).float()
    native = decode(step, model, pool, tables, PROMPTS, rows, native=True).float()
    # the final RMSNorm makes every row's scale ~1: errors are relative to that
    error = (native - eager).abs().max().item()
    assert error < 0.05, error
    assert (native == eager).float().mean() > 0.9  # nearly all of them to the bit


@pytest.mark.parametrize("phased", [False, True])
def test_a_step_carrying_prefill_matches_the_eager_model(case, phased):
    """Two decode rows, a prompt's second chunk and a new prompt in one step, each token a
    row of the native attention over its own sequence: the eager model's hidden states (its
    chunks through SDPA) to bf16 rounding, for every token."""
    model, _, _ = case
    pool, tables = prefilled(model, PROMPTS)
    step = NativeDecodeStep.build(model, pool)
    if phased and not step.fused:
        pytest.skip("phased already")
    if phased:
        step = NativeDecodeStep(model, pool, native_cpu.library(), fused=False)
    fresh, resumed = [11, 4, 60, 5, 19, 33, 2, 8, 41, 6, 7, 12], PROMPTS[2]
    segments = [Segment(tables[0], len(PROMPTS[0]), 1), Segment(tables[1], len(PROMPTS[1]), 1),
                Segment(tables[2], 10, len(resumed) - 10), Segment(list(range(40, 43)), 0, 12)]
    ids = torch.tensor([PROMPTS[0][-1], PROMPTS[1][-1], *resumed[10:], *fresh])
    assert step.takes(segments, pool.block_size)
    with torch.inference_mode():  # the eager step first: both rewrite the same positions
        attention = StepAttention(pool, segments, cascade=False)
        eager = model.hidden_states(ids[None], attention.positions, attention)[0].float()
        native = step(ids, StepAttention(pool, segments, every_token_a_row=True)).float()
    assert native.shape == eager.shape == (len(ids), model.config.d_model)
    error = (native - eager).abs().max().item()
    assert error < 0.05, error
    # the decode rows read the same kernel either way: nearly all to the bit; the prefill
    # rows' attention sums in another order than SDPA's, so their last bits differ
    assert (native[:2] == eager[:2]).float().mean() > 0.9


def test_a_row_alone_equals_it_in_a_batch(case):
    model, _, _ = case
    pool, tables = prefilled(model, PROMPTS)
    step = NativeDecodeStep.build(model, pool)
    batch = decode(step, model, pool, tables, PROMPTS, [0, 1, 2], native=True)
    for r in range(len(PROMPTS)):
        alone = decode(step, model, pool, tables, PROMPTS, [r], native=True)
        assert torch.equal(alone[0], batch[r])


def test_the_avx2_build_gives_the_same_bits(case):
    model, _, _ = case
    if not native_cpu.ISAS["avx2"][1] <= native_cpu.cpu_flags() or not native_cpu.full_build():
        pytest.skip("needs a CPU that runs both builds")
    if any(getattr(m, "bits", 4) == 8 for m in model.modules()) or \
            type(model.blocks[0].attn.qkv).__name__ == "Int8Linear":
        pytest.skip("the AVX2 build has no 8-bit path")
    pool, tables = prefilled(model, PROMPTS)
    full = NativeDecodeStep(model, pool, native_cpu.library())
    avx2 = NativeDecodeStep(model, pool, native_cpu.load("avx2"))
    rows = [0, 1, 2]
    assert torch.equal(decode(full, model, pool, tables, PROMPTS, rows, True),
                       decode(avx2, model, pool, tables, PROMPTS, rows, True))


class _Counted:
    """The engine's native step, recording each call's row count (the engine asks only
    `takes`, calls it and its `logits`)."""

    def __init__(self, step: NativeDecodeStep, rows: list[int], decode_only: bool = False):
        """`decode_only`: decline steps that carry prefill (they run eager)."""
        self.step, self.rows, self.decode_only = step, rows, decode_only

    def takes(self, segments, block_size: int) -> bool:
        if self.decode_only and any(s.length > 1 for s in segments):
            return False
        return self.step.takes(segments, block_size)

    def logits(self, h):
        return self.step.logits(h)

    def __call__(self, input_ids, attention):
        self.rows.append(len(input_ids))
        return self.step(input_ids, attention)


def _greedy(model, tokenizer, native: bool, prompts=PROMPTS, stagger: bool = False,
            decode_only: bool = False) -> tuple[dict, list[int]]:
    """Greedy tokens per request, and the row count of every step the native step ran.
    `stagger`: one request arrives per step, so its prompt rides along with the others'
    decode rows. `decode_only`: the native step runs decode steps only."""
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype="bfloat16", max_num_seqs=64))
    assert engine.native_step is not None
    rows: list[int] = []
    engine.native_step = _Counted(engine.native_step, rows, decode_only) if native else None
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = {f"r{i}": [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        for i, p in pending[: 1 if stagger else len(pending)]:
            engine.add_request(f"r{i}", p, params)
        pending = pending[1:] if stagger else []
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out, rows


@pytest.mark.parametrize("stagger", [False, True])
def test_the_engine_decodes_with_it_and_gives_the_eager_tokens(case, stagger):
    """Prefill steps and steps mixing prompts with decode rows too run natively."""
    model, tokenizer, _ = case
    native, rows = _greedy(model, tokenizer, True, stagger=stagger)
    assert native == _greedy(model, tokenizer, False, stagger=stagger)[0]
    tokens = sum(map(len, PROMPTS))
    assert rows[0] == (len(PROMPTS[0]) if stagger else tokens)
    if stagger:  # the second prompt with the first one's decode row
        assert rows[1] == len(PROMPTS[1]) + 1


def _bounds(way: str) -> tuple[int, int]:
    """(rows, rows sharing a prefix) a step of this way takes"""
    return (FUSED_MAX_ROWS, FUSED_SHARED_MAX_ROWS) if way == "fused" else \
        (PHASED_MAX_ROWS, PHASED_SHARED_MAX_ROWS)


def test_steps_above_the_shared_bound_take_it_when_no_prefix_is_shared(case):
    """Between the shared-prefix bound and the row bound, unshared rows decode natively
    and give the eager tokens. (Prefill eager: on these random models a prompt's first token
    can be a tie to one bf16 step, which the native prefill's last bits may tip.)"""
    model, tokenizer, way = case
    most, shared = _bounds(way)
    n = (shared + most) // 2
    prompts = [[(7 * i + j) % 50 + 3 for j in range(5 + i % 7)] for i in range(n)]
    native, rows = _greedy(model, tokenizer, True, prompts, decode_only=True)
    assert max(rows) == n  # the whole batch in one native step
    assert native == _greedy(model, tokenizer, False, prompts)[0]


def test_it_is_off_where_it_cannot_run(case, monkeypatch):
    model, tokenizer, way = case
    pool = KVCachePool(model.config, 4, 4, torch.bfloat16, "cpu")
    step = NativeDecodeStep.build(model, pool)
    most, shared = _bounds(way)
    assert (step.max_rows, step.shared_max_rows) == (most, shared)
    bs = pool.block_size

    long = -(-CASCADE_NATIVE_MIN_TOKENS // bs)  # blocks of a prefix cascade decode takes

    def rows(n, share=0, length=1):  # n segments past `share` shared blocks, or 5 of their own
        own = max(share, 5)
        return [Segment(list(range(share)) + [10_000 + i] if share else
                        [10 * i + j for j in range(6)], own * bs, length) for i in range(n)]
    assert step.takes(rows(1), bs) and step.takes(rows(most), bs)
    assert not step.takes(rows(most + 1), bs)
    # prefill chunks come along up to the mixed bound, counted in tokens, while their tokens
    # attend to PREFILL_MAX_MEAN_KEYS positions or fewer on average
    def chunk(start, length):
        return Segment(list(range(-(-(start + length) // bs))), start, length)
    half = step.mixed_max_rows // 2
    assert step.takes(rows(2, length=2), bs) and step.takes([chunk(0, half)] * 2, bs)
    assert not step.takes([chunk(0, half), chunk(0, half + 1)], bs)
    assert step.takes([chunk(PREFILL_MAX_MEAN_KEYS - 2, 2), *rows(3)], bs)  # mean start + 1.5
    assert not step.takes([chunk(PREFILL_MAX_MEAN_KEYS - 1, 2), *rows(3)], bs)
    # rows sharing a long prefix: past `shared`, the eager step's cascade decode takes them
    assert step.takes(rows(shared, share=long), bs)
    assert not step.takes(rows(shared + 1, share=long), bs)
    assert step.takes(rows(most, share=5), bs)  # a short one: the native kernel reads it
    assert NativeDecodeStep.build(model, KVCachePool(model.config, 4, 4, torch.float32,
                                                     "cpu")) is None
    assert NativeDecodeStep.build(make_model("test"), pool) is None  # an fp32 model
    invariant = LLMEngine(model, tokenizer, EngineConfig(dtype="bfloat16",
                                                        batch_invariant=True))
    assert invariant.native_step is None  # larger steps' eager bits could differ
    monkeypatch.setenv("FANFORMER_NATIVE_STEP", "0")
    assert NativeDecodeStep.build(model, pool) is None


class _CountedLibrary:
    """A kernel library whose fused-step calls are counted (the rest passes through)."""

    def __init__(self, lib):
        self.lib, self.fused_calls = lib, 0

    def fanformer_decode_step(self, *args):
        self.fused_calls += 1
        return self.lib.fanformer_decode_step(*args)

    def __getattr__(self, name):
        return getattr(self.lib, name)


def test_bf16_steps_are_fused_up_to_the_dense_bound_and_phased_above():
    model = make_model("transformer-test").to(torch.bfloat16)
    bound = NativeDecodeStep.dense_fused_max_rows()
    prompts = [[(5 * i + j) % 60 + 3 for j in range(3 + i % 4)] for i in range(bound + 1)]
    pool, tables = prefilled(model, prompts)
    step = NativeDecodeStep.build(model, pool)
    step.lib = counted = _CountedLibrary(step.lib)
    phased = NativeDecodeStep(model, pool, native_cpu.library(), fused=False)
    for n, fused_calls in ((bound, 1), (bound + 1, 1)):
        rows = list(range(n))
        ours = decode(step, model, pool, tables, prompts, rows, native=True)
        assert counted.fused_calls == fused_calls
        theirs = decode(phased, model, pool, tables, prompts, rows, native=True)
        assert (ours.float() - theirs.float()).abs().max() < 0.05
