"""SamplingParams validation messages and the batched sampler's filters and penalties."""

from __future__ import annotations

import pytest
import torch

from fanformer.generate import sample_next
from server.sampling import SamplingParams, SamplingState, sample_batch, top_logprobs

VOCAB = 8


def state(params: SamplingParams, output_ids=(), prompt_ids=(0,), eos=None) -> SamplingState:
    return SamplingState.create(params, list(prompt_ids), list(output_ids), eos, "cpu")


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
    fast = sample_batch(logits, [state(SamplingParams(temperature=0)) for _ in range(5)])
    # a logit bias of 0 forces the per-row path
    slow = sample_batch(logits, [state(SamplingParams(temperature=0, logit_bias={0: 0.0}))
                                 for _ in range(5)])
    assert fast == slow == logits.argmax(-1).tolist()


def test_seeded_draws_match_the_reference_sampler():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=42)
    s = state(params)
    ours = [sample_batch(logits[None], [s])[0] for _ in range(20)]
    g = torch.Generator().manual_seed(42)
    ref = [sample_next(logits, 0.8, 5, 0.9, g) for _ in range(20)]
    assert ours == ref


def test_filters_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    def support(**kw):
        s = state(SamplingParams(seed=0, **kw))
        return {sample_batch(logits, [s])[0] for _ in range(300)}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.5) == {0}
    assert support(min_p=0.3) == {0, 1}  # p1/p0 = e^-1 = 0.37 >= 0.3; p2/p0 = 0.14 < 0.3
    assert len(support(temperature=5.0)) > 4


def test_penalties_bias_and_min_tokens():
    logits = torch.tensor([[5.0, 4.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    greedy = dict(temperature=0)
    assert sample_batch(logits, [state(SamplingParams(**greedy, logit_bias={3: 10.0}))]) == [3]
    # repetition: 5/3 < 4, so token 0 (in the prompt) loses to token 1
    assert sample_batch(logits, [state(SamplingParams(**greedy, repetition_penalty=3.0),
                                       prompt_ids=[0])]) == [1]
    # a penalty that underflows to 0 in fp32 boosts the seen token, never makes NaN (was a 500)
    for seed in range(3):
        assert sample_batch(logits, [state(SamplingParams(repetition_penalty=5e-324, seed=seed),
                                           prompt_ids=[1])]) == [1]
    # frequency: 5 - 2 * 1 = 3 < 4
    assert sample_batch(logits, [state(SamplingParams(**greedy, frequency_penalty=2.0),
                                       output_ids=[0])]) == [1]
    assert sample_batch(logits, [state(SamplingParams(**greedy, presence_penalty=-2.0),
                                       output_ids=[2])]) == [0]  # -1 + 2 = 1 < 5
    # min_tokens masks EOS (token 0 here) and stop ids until enough tokens exist
    p = SamplingParams(**greedy, min_tokens=2, stop_token_ids=[1])
    assert sample_batch(logits, [state(p, output_ids=[5], eos=0)]) == [3]
    assert sample_batch(logits, [state(p, output_ids=[5, 5], eos=0)]) == [0]
    p = SamplingParams(**greedy, min_tokens=2, ignore_eos=True)
    assert sample_batch(logits, [state(p, eos=0)]) == [0]


def test_a_failing_row_returns_its_exception():
    logits = torch.randn(2, VOCAB)
    bad = state(SamplingParams(temperature=1.0, seed=0))
    bad.params.temperature = float("nan")
    out = sample_batch(logits, [state(SamplingParams(temperature=0, logit_bias={0: 0.0})), bad])
    assert isinstance(out[0], int) and isinstance(out[1], Exception)


def test_top_logprobs():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0]]), -1)
    ((chosen, top),) = top_logprobs(logprobs, torch.tensor([2]), 2)
    assert chosen == pytest.approx(float(logprobs[0, 2]))
    assert [t for t, _ in top] == [1, 2]
