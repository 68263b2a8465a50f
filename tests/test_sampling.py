"""SamplingParams validation messages and the batched sampler's filters and penalties; each
sampler test runs twice, with the first draw in C (quant/native_sample.c) and in torch."""

from __future__ import annotations

import pytest
import torch

import server.sampling
from fanformer.generate import sample_next
from quant import native_cpu
from server.request import Request
from server.sampling import SamplingParams, sample, top_logprobs

VOCAB = 8


@pytest.fixture(autouse=True, params=["native", "torch"])
def first_draw(request, monkeypatch):
    """Which first draw `sample` takes: the native kernel's, or torch's (as on a GPU or
    where the kernels cannot be built)."""
    if request.param == "native" and native_cpu.library() is None:
        pytest.skip("the native CPU kernels do not run here")
    if request.param == "torch":
        monkeypatch.setattr(server.sampling, "_native_first_draw", lambda *args: None)
    return request.param


def state(params: SamplingParams, output_ids=(), prompt_ids=(0,), eos=None) -> Request:
    request = Request.create("r", list(prompt_ids), params, eos)
    request.output_ids = list(output_ids)
    return request


@pytest.mark.parametrize("kwargs,message", [
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ({"max_tokens": 0}, "unless prompt_logprobs"),
    ({"min_tokens": 20}, "min_tokens must be in [0, max_tokens=16]"),
    ({"top_k": -2}, "top_k must be -1, 0"),
    ({"min_p": 1.5}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ({"logit_bias": {99: 1.0}}, "logit_bias keys must be token ids in [0, 8)"),
    ({"logit_bias": {1: 101.0}}, "logit_bias values must be in [-100, 100]"),
    ({"stop_token_ids": [8]}, "stop_token_ids must be token ids in [0, 8)"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"n": 17}, "n must be in [1, 16]"),
    ({"logprobs": 21}, "logprobs must be in [0, 20]"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20]"),
])
def test_validation_names_the_valid_range(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs).validate(VOCAB)
    assert message in str(e.value)


def test_valid_params_pass():
    SamplingParams(max_tokens=0, prompt_logprobs=0).validate(VOCAB)
    SamplingParams(top_k=-1, logit_bias={3: -100}, stop=["x"], n=16, logprobs=20).validate(VOCAB)


def test_greedy_fast_path_and_slow_path_agree():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    fast = sample(logits, [state(SamplingParams(temperature=0)) for _ in range(5)])
    # a logit bias of 0 forces the per-row path
    slow = sample(logits, [state(SamplingParams(temperature=0, logit_bias={0: 0.0}))
                                 for _ in range(5)])
    assert fast == slow == logits.argmax(-1).tolist()


def test_seeded_draws_match_the_reference_sampler():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=42)
    s = state(params)
    ours = [sample(logits[None], [s])[0] for _ in range(20)]
    g = torch.Generator().manual_seed(42)
    ref = [sample_next(logits, 0.8, 5, 0.9, g) for _ in range(20)]
    assert ours == ref


def test_filters_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    def support(**kw):
        s = state(SamplingParams(seed=0, **kw))
        return {sample(logits, [s])[0] for _ in range(300)}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.5) == {0}
    assert support(min_p=0.3) == {0, 1}  # p1/p0 = e^-1 = 0.37 >= 0.3; p2/p0 = 0.14 < 0.3
    assert len(support(temperature=5.0)) > 4


def test_penalties_bias_and_min_tokens():
    logits = torch.tensor([[5.0, 4.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    greedy = dict(temperature=0)
    assert sample(logits, [state(SamplingParams(**greedy, logit_bias={3: 10.0}))]) == [3]
    # repetition: 5/3 < 4, so token 0 (in the prompt) loses to token 1
    assert sample(logits, [state(SamplingParams(**greedy, repetition_penalty=3.0),
                                       prompt_ids=[0])]) == [1]
    # a penalty that underflows to 0 in fp32 boosts the seen token, never makes NaN (was a 500)
    for seed in range(3):
        assert sample(logits, [state(SamplingParams(repetition_penalty=5e-324, seed=seed),
                                           prompt_ids=[1])]) == [1]
    # frequency: 5 - 2 * 1 = 3 < 4
    assert sample(logits, [state(SamplingParams(**greedy, frequency_penalty=2.0),
                                       output_ids=[0])]) == [1]
    assert sample(logits, [state(SamplingParams(**greedy, presence_penalty=-2.0),
                                       output_ids=[2])]) == [0]  # -1 + 2 = 1 < 5
    # min_tokens masks EOS (token 0 here) and stop ids until enough tokens exist
    p = SamplingParams(**greedy, min_tokens=2, stop_token_ids=[1])
    assert sample(logits, [state(p, output_ids=[5], eos=0)]) == [3]
    assert sample(logits, [state(p, output_ids=[5, 5], eos=0)]) == [0]
    p = SamplingParams(**greedy, min_tokens=2, ignore_eos=True)
    assert sample(logits, [state(p, eos=0)]) == [0]


def test_a_failing_row_returns_its_exception(monkeypatch):
    logits = torch.randn(3, VOCAB)
    real = server.sampling._row_uniforms

    def uniform(request):
        if request.params.seed == 666:
            raise RuntimeError("boom")
        return real(request)
    monkeypatch.setattr(server.sampling, "_row_uniforms", uniform)
    rows = [state(SamplingParams(temperature=0, logit_bias={0: 0.0})),
            state(SamplingParams(seed=666)), state(SamplingParams(seed=1))]
    out = sample(logits, rows)
    assert isinstance(out[0], int) and isinstance(out[2], int)
    assert isinstance(out[1], RuntimeError)


def test_non_finite_logits_fail_their_row_alone():
    logits = torch.randn(2, VOCAB)
    logits[1, 3] = float("nan")
    out = sample(logits, [state(SamplingParams(seed=1)), state(SamplingParams(seed=2))])
    assert isinstance(out[0], int) and isinstance(out[1], ValueError)


def test_top_logprobs():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0]]), -1)
    ((chosen, top),) = top_logprobs(logprobs, torch.tensor([2]), 2)
    assert chosen == pytest.approx(float(logprobs[0, 2]))
    assert [t for t, _ in top] == [1, 2]


MIXED = [dict(temperature=0.8, top_p=0.95), dict(temperature=1.0, top_k=50),
         dict(temperature=0.7, top_p=0.5, top_k=100, min_p=0.05), dict(temperature=0),
         dict(temperature=1.3), dict(temperature=0.8, top_p=0.9, presence_penalty=0.5),
         dict(temperature=0.5, top_p=0.99, logit_bias={7: 3.0}),
         dict(temperature=2.0, top_p=0.3, min_p=0.2, repetition_penalty=1.3)]


# sampled rows with nothing that edits the logits: the sampler's path without a copy
PLAIN = [kw for kw in MIXED if kw.get("temperature", 1.0) > 0 and set(kw) <= {
    "temperature", "top_p", "top_k", "min_p"}]


@pytest.mark.parametrize("batch", ["mixed", "plain"])
@pytest.mark.parametrize("scale,bf16", [(0.3, False), (3.0, False), (1.0, True)])
def test_a_batch_draws_what_the_reference_draws_row_by_row(scale, bf16, batch):
    """Every row of one batched pass equals `sample_next` under the same seed, step after
    step, with each row's own filters; bf16 logits (many exact ties; the engine's CPU
    dtype) included, and batches whose rows edit nothing (no copy before the filters)."""
    vocab = 4096
    kinds = MIXED if batch == "mixed" else PLAIN
    gen = torch.Generator().manual_seed(7)
    rows = [state(SamplingParams(seed=i, **kw), prompt_ids=[7, 9]) for i, kw in enumerate(kinds)]
    refs = [torch.Generator().manual_seed(i) for i in range(len(kinds))]
    for _ in range(4):
        logits = torch.randn(len(kinds), vocab, generator=gen) * scale
        if bf16:
            logits = logits.bfloat16()
        before = logits.clone()
        ours = sample(logits, rows)
        assert torch.equal(logits, before)  # the engine's logits are never edited
        for i, (row, ref) in enumerate(zip(rows, refs)):
            p = row.params
            edited = _reference_edits(logits[i].float(), row)
            assert ours[i] == sample_next(edited, p.temperature, p.top_k, p.top_p, ref, p.min_p)
            row.append(ours[i])


def _reference_edits(row: torch.Tensor, request: Request) -> torch.Tensor:
    """Bias and penalties one row at a time, as written in vLLM's docs."""
    p, row = request.params, row.clone()
    for token, bias in (p.logit_bias or {}).items():
        row[token] += bias
    for token in set(request.prompt_ids) | set(request.output_ids):
        value = row[token]
        row[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(request.output_ids):
        count = request.output_ids.count(token)
        row[token] -= p.frequency_penalty * count + p.presence_penalty
    return row


@pytest.mark.parametrize("kw", [dict(), dict(top_k=3), dict(top_p=0.8), dict(min_p=0.2),
                                dict(top_k=5, top_p=0.9, temperature=0.7)])
def test_draws_follow_the_filtered_distribution(kw):
    """2,000 rows with their own seeds in one batch: the empirical frequencies match the
    softmax of the filtered logits (total variation below 0.05; ~0.02 expected)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(**{"temperature": 1.0, **kw})
    x = logits / params.temperature
    keep = torch.ones(VOCAB, dtype=torch.bool)
    order = x.argsort(descending=True)
    if params.top_k:
        keep[order[params.top_k:]] = False
    probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    if params.top_p < 1:
        mass_above = probs[order].cumsum(0) - probs[order]
        keep[order[mass_above >= params.top_p]] = False
    probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    keep &= probs >= params.min_p * probs.max()
    expected = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    n = 2000
    rows = [state(SamplingParams(**{**kw, "seed": 1000 + i})) for i in range(n)]
    drawn = torch.tensor(sample(logits.expand(n, VOCAB), rows))
    observed = torch.bincount(drawn, minlength=VOCAB).float() / n
    assert set(drawn.tolist()) <= set(keep.nonzero()[:, 0].tolist())
    assert 0.5 * (observed - expected).abs().sum() < 0.05


def test_top_p_keeps_every_tie_and_the_top_token():
    flat = torch.zeros(1, VOCAB)
    seen = {sample(flat, [state(SamplingParams(top_p=0.1, seed=s))])[0] for s in range(200)}
    assert seen == set(range(VOCAB))  # all tied with the top token: none can be dropped
    peaked = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert {sample(peaked, [state(SamplingParams(top_p=5e-324, seed=s))])[0]
            for s in range(20)} == {0}


def test_sum_above_is_the_masked_sum_bit_for_bit():
    """The nucleus check's arithmetic mask sums exactly what torch.where keeps: ties with w
    excluded (strictly above), zeros (dropped tokens) and the drawn token itself included."""
    from server.sampling import _sum_above

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(8, 5000, generator=g)
    weights[:, ::7] = 0.0  # dropped tokens
    weights[:, 1::50] = weights[:, :1]  # ties with the drawn weight below
    w = weights[:, :1].clone()  # (8, 1)
    expected = torch.where(weights > w, weights, 0.0).sum(-1, keepdim=True)
    assert torch.equal(_sum_above(weights, w), expected)
    assert torch.equal(_sum_above(weights, torch.zeros(8, 1)),
                       torch.where(weights > 0, weights, 0.0).sum(-1, keepdim=True))

