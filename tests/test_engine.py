"""The engine against the reference loop: greedy equality alone and batched, chunked prefill on
and off, seeded sampling batch-invariance, logprobs, errors, aborts, and the async front.
The relational tests take the `device` fixture: they run on CUDA too where there is one."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from fanformer.generate import generate
from server.async_engine import AsyncEngine
from server.engine import (
    EngineConfig,
    LLMEngine,
    QueueFullError,
    RequestTooLongError,
)
from server.sampling import SamplingParams
from tests.conftest import make_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait
    for each other make every small matmul cost a millisecond."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = [[5], [17, 42, 9], list(range(3, 40)), [(7 * i) % 500 + 1 for i in range(70)]]


def make_engine(model, tokenizer, **overrides) -> LLMEngine:
    config = EngineConfig(**{"dtype": "float32", "max_num_seqs": 8, **overrides})
    return LLMEngine(model, tokenizer, config)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Submit everything, step to the end; returns request id -> (token ids, text, outputs)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    results = {rid: ([], "", []) for rid in requests}
    finished = set()
    while engine.has_unfinished():
        for out in engine.step():
            ids, text, outs = results[out.request_id]
            assert out.request_id not in finished, "an output after the final one"
            results[out.request_id] = (ids + out.token_ids, text + out.text, outs + [out])
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(requests), "every request finishes exactly once"
    return results


@pytest.mark.parametrize("chunked,budget", [(True, 16), (True, 512), (False, 512)])
def test_greedy_matches_reference_alone_and_batched(tokenizer, chunked, budget, device):
    model = make_model().to(device)
    expected = [generate(model, p, 12, temperature=0) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):  # each alone
        engine = make_engine(model, tokenizer, enable_chunked_prefill=chunked,
                             max_num_batched_tokens=budget, device=device)
        ids, _, _ = run_all(engine, {"a": (prompt, greedy)})["a"]
        assert ids == expected[i]
    engine = make_engine(model, tokenizer, enable_chunked_prefill=chunked,
                         max_num_batched_tokens=budget, device=device)
    together = run_all(engine, {str(i): (p, greedy) for i, p in enumerate(PROMPTS)})
    assert [together[str(i)][0] for i in range(len(PROMPTS))] == expected


def test_greedy_matches_reference_with_staggered_arrivals(tokenizer, device):
    """Requests joining a running batch (non-contiguous slots after an early finish)."""
    model = make_model(preset="transformer-test").to(device)
    engine = make_engine(model, tokenizer, max_num_batched_tokens=24, device=device)
    lengths = [3, 20, 5, 9, 14, 2]
    prompts = [[(11 * i + 3 * j) % 500 + 1 for j in range(6 + 5 * i)] for i in range(6)]
    expected = {str(i): generate(model, p, n, temperature=0)
                for i, (p, n) in enumerate(zip(prompts, lengths))}
    got = {str(i): [] for i in range(6)}
    pending = list(range(6))
    while pending or engine.has_unfinished():
        if pending:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i],
                               SamplingParams(max_tokens=lengths[i], temperature=0,
                                              ignore_eos=True))
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert got == expected


def test_seeded_sampling_is_batch_invariant(tokenizer, device):
    model = make_model().to(device)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1234,
                            ignore_eos=True)
    alone = run_all(make_engine(model, tokenizer, device=device),
                    {"x": (PROMPTS[1], params)})["x"][0]
    others = {f"o{i}": (p, SamplingParams(max_tokens=7, temperature=1.0, seed=i))
              for i, p in enumerate(PROMPTS)}
    mixed = run_all(make_engine(model, tokenizer, max_num_batched_tokens=20, device=device),
                    {**others, "x": (PROMPTS[1], params)})["x"][0]
    assert alone == mixed
    reference = generate(model, PROMPTS[1], 10, temperature=0.9, top_k=50, top_p=0.9,
                         generator=torch.Generator(device).manual_seed(1234))
    assert alone == reference  # same filters, same generator: the reference loop's draws


@pytest.mark.parametrize("preset", ["test", "transformer-test"])
def test_bf16_requests_give_the_same_tokens_alone_and_in_a_crowd(tokenizer, preset, device):
    """In bf16 too (where rounding would show any dependence on the batch), a request gets
    the tokens it gets alone when others of other lengths decode beside it and new prompts
    are prefilled in the same steps: greedy and seeded sampling, decode spans past 64.
    (A prompt split into other prefill chunks may differ in bf16: not tested.)"""
    model = make_model(preset).to(device)
    requests = {f"r{i}": (p, SamplingParams(max_tokens=12, seed=i, ignore_eos=True,
                                            temperature=0.0 if i % 2 else 0.8, top_p=0.9))
                for i, p in enumerate(PROMPTS + [list(range(1, 110))])}
    engine = make_engine(model, tokenizer, dtype="bfloat16", device=device)
    crowd = {rid: [] for rid in requests}
    for k, (rid, (prompt, params)) in enumerate(requests.items()):
        engine.add_request(rid, prompt, params)
        for _ in range(k % 3):  # later prompts arrive while earlier ones decode
            for out in engine.step():
                crowd[out.request_id] += out.token_ids
    while engine.has_unfinished():
        for out in engine.step():
            crowd[out.request_id] += out.token_ids
    for rid, request in requests.items():
        alone = run_all(make_engine(model, tokenizer, dtype="bfloat16", device=device),
                        {rid: request})
        assert crowd[rid] == alone[rid][0], rid


def test_logprobs_and_prompt_logprobs_match_a_full_forward(tokenizer, device):
    model = make_model().to(device)
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1,
                            ignore_eos=True)
    engine = make_engine(model, tokenizer, max_num_batched_tokens=10,  # chunked prompt
                         device=device)
    ids, _, outs = run_all(engine, {"a": (prompt, params)})["a"]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + ids], device=device))[0].float(),
                                 -1)
    plp = outs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for p in range(1, len(prompt)):
        assert plp[p].token_id == prompt[p]
        assert plp[p].logprob == pytest.approx(float(full[p - 1, prompt[p]]), abs=1e-4)
        assert len(plp[p].top) == 1
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == ids
    for i, lp in enumerate(lps):
        position = len(prompt) - 1 + i
        assert lp.logprob == pytest.approx(float(full[position, ids[i]]), abs=1e-4)
        assert lp.top[0][0] == ids[i] and len(lp.top) == 2  # greedy: the best is chosen
    assert all(o.prompt_logprobs is None for o in outs[1:])


@pytest.mark.parametrize("fp32_logits", [True, False])
def test_bf16_logits_come_from_an_fp32_head_when_asked(tokenizer, fp32_logits, monkeypatch):
    """fp32_logits: the LM head runs in fp32 on the bf16 hidden states (no bf16-rounded
    logits, so no exact ties); off (the CPU default), the bf16 head's logits are cast.
    The eager model's steps, so that the hidden states are the full forward's bits (the
    native step's prompt rows agree to bf16 rounding: tests/test_native_step.py)."""
    monkeypatch.setenv("FANFORMER_NATIVE_STEP", "0")
    model = make_model()
    prompt = PROMPTS[2]
    engine = make_engine(model, tokenizer, dtype="bfloat16", fp32_logits=fp32_logits)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)
    plp = run_all(engine, {"a": (prompt, params)})["a"][2][0].prompt_logprobs
    with torch.no_grad():
        hidden = engine.model.hidden_states(torch.tensor([prompt]))[0]  # bf16 (T, d)
        head = engine.model.lm_head.weight
        fp32 = torch.log_softmax(hidden.float() @ head.float().T, -1)
        bf16 = torch.log_softmax((hidden @ head.T).float(), -1)
    want, other = (fp32, bf16) if fp32_logits else (bf16, fp32)
    got = torch.tensor([plp[p].logprob for p in range(1, len(prompt))])
    rows = torch.arange(len(prompt) - 1)
    targets = torch.tensor(prompt[1:])
    assert torch.allclose(got, want[rows, targets], atol=1e-5)
    assert not torch.allclose(got, other[rows, targets], atol=1e-5)


def test_echo_scoring_with_zero_max_tokens(tokenizer):
    engine = make_engine(make_model(), tokenizer)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    ids, text, outs = run_all(engine, {"a": (PROMPTS[1], params)})["a"]
    assert ids == [] and text == "" and outs[-1].finish_reason == "length"
    assert len(outs[0].prompt_logprobs) == len(PROMPTS[1])


def test_eos_and_stop_token_ids_finish_with_stop(tokenizer):
    model = make_model()
    first = generate(model, PROMPTS[2], 30, temperature=1.0,
                     generator=torch.Generator().manual_seed(3))
    k = next(i for i in range(1, 30) if first[i] not in first[:i])  # a token new at k
    engine = make_engine(model, tokenizer)
    params = SamplingParams(max_tokens=30, seed=3, ignore_eos=True, stop_token_ids=[first[k]])
    ids, _, outs = run_all(engine, {"a": (PROMPTS[2], params)})["a"]
    assert ids == first[: k + 1] and outs[-1].finish_reason == "stop"
    params = SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[first[0]], min_tokens=2)
    ids, _, _ = run_all(make_engine(model, tokenizer), {"a": (PROMPTS[2], params)})["a"]
    assert first[0] not in ids[:2]
    eos = tokenizer.eos_id  # EOS ends a request unless ignore_eos
    engine = make_engine(model, tokenizer)
    params = SamplingParams(max_tokens=30, temperature=0, logit_bias={eos: 100.0})
    ids, text, outs = run_all(engine, {"a": (PROMPTS[2], params)})["a"]
    assert ids == [eos] and text == "" and outs[-1].finish_reason == "stop"


def test_refusals(tokenizer):
    engine = make_engine(make_model(), tokenizer, max_model_len=64, max_queue_len=1)
    with pytest.raises(RequestTooLongError, match="64"):
        engine.add_request("a", list(range(1, 60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.add_request("a", [1], SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("a", [], SamplingParams())
    engine.add_request("a", [1], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("b", [1], SamplingParams())


def test_one_failing_request_does_not_stop_the_others(tokenizer, monkeypatch):
    import server.sampling as sampling

    engine = make_engine(make_model(), tokenizer)
    original = sampling._row_uniforms

    def uniform(request):
        if request.params.seed == 666:
            raise RuntimeError("boom")
        return original(request)

    monkeypatch.setattr(sampling, "_row_uniforms", uniform)
    res = run_all(engine, {"bad": ([1, 2], SamplingParams(max_tokens=4, seed=666)),
                           "good": ([1, 2], SamplingParams(max_tokens=4, seed=1,
                                                           ignore_eos=True))})
    assert res["bad"][2][-1].finish_reason == "error" and "boom" in res["bad"][2][-1].error
    assert len(res["good"][0]) == 4
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_random_requests_and_aborts_free_every_slot(tokenizer):
    rng = random.Random(0)
    model = make_model()
    engine = make_engine(model, tokenizer, max_num_seqs=6, max_num_batched_tokens=32,
                         max_queue_len=1000)
    finals: dict[str, int] = {}
    submitted, aborted = [], set()
    for _ in range(2000):
        if len(submitted) < 300 and rng.random() < 0.6:
            rid = f"r{len(submitted)}"
            prompt = [rng.randrange(1, 500) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 1]),
                                    seed=rng.randrange(100), stop=rng.choice([[], ["e"]]))
            engine.add_request(rid, prompt, params)
            submitted.append(rid)
        if submitted and rng.random() < 0.15:
            rid = rng.choice(submitted)
            if rid not in finals and rid not in aborted:
                engine.abort(rid)
                aborted.add(rid)
        for out in engine.step():
            assert out.request_id not in finals and out.request_id not in aborted
            if out.finished:
                finals[out.request_id] = 1
        if len(submitted) == 300 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    assert set(finals) | aborted == set(submitted) and not set(finals) & aborted
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.kv_cache_usage == 0


def test_async_engine_streams_and_aborts_on_early_exit(tokenizer):
    model = make_model()
    expected = generate(model, PROMPTS[2], 8, temperature=0)

    async def main():
        engine = AsyncEngine(make_engine(model, tokenizer))
        await engine.start()
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        ids = []
        async for out in engine.generate(PROMPTS[2], params):
            ids += out.token_ids
        assert ids == expected
        gen = engine.generate(PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True),
                              request_id="early")
        await gen.__anext__()
        await gen.aclose()  # the consumer leaves: the request is aborted
        with pytest.raises(RequestTooLongError):
            await engine.generate(PROMPTS[2], SamplingParams(max_tokens=1000)).__anext__()
        both = await asyncio.gather(*[collect(engine, p) for p in PROMPTS])
        await engine.shutdown()
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks
        return both

    async def collect(engine, prompt):
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        return [t async for out in engine.generate(prompt, params) for t in out.token_ids]

    both = asyncio.run(main())
    assert both == [generate(model, p, 5, temperature=0) for p in PROMPTS]


def test_generate_cli_matches_the_reference_cli(checkpoint_dir, capsys):
    from fanformer.generate import main as reference_main
    from server.generate_cli import main

    args = ["--checkpoint", str(checkpoint_dir), "--prompt", "Alice was", "--max_length", "12",
            "--temperature", "0"]
    assert reference_main(args) == 0
    expected = capsys.readouterr().out
    assert main(args + ["--dtype", "float32"]) == 0
    assert capsys.readouterr().out == expected
    assert main(args[:4] + ["--max_length", "5000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fanformer-generate: error:") and "context" in err
    assert main(["--checkpoint", str(checkpoint_dir / "missing"), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_kv_cache_is_sized_from_a_memory_budget(tokenizer):
    from server.kv_cache import KVCachePool

    model = make_model()
    per_block = KVCachePool.bytes_per_token(model.config, torch.float32) * 16
    engine = make_engine(model, tokenizer, max_model_len=64, kv_cache_gib=3.5 * per_block / 2**30)
    assert engine.stats().num_blocks == 3 and engine.pool.nbytes == 3 * per_block
    with pytest.raises(RequestTooLongError, match="does not fit the KV cache"):
        engine.add_request("a", list(range(1, 41)), SamplingParams(max_tokens=10))  # 4 blocks
    engine.add_request("b", list(range(1, 31)), SamplingParams(max_tokens=18))  # 3 blocks
    with pytest.raises(ValueError, match="holds no KV block"):
        make_engine(model, tokenizer, max_model_len=64, kv_cache_gib=0.5 * per_block / 2**30)
    default = make_engine(model, tokenizer, max_model_len=40, max_num_seqs=3)
    assert default.stats().num_blocks == 3 * 3  # max_num_seqs sequences of max_model_len


def test_a_failing_forward_kills_the_engine_and_finishes_pending_requests(tokenizer):
    from server.engine import EngineDeadError

    async def main():
        llm = make_engine(make_model(), tokenizer)
        engine = AsyncEngine(llm)
        await engine.start()

        def broken(plan):
            raise RuntimeError("out of memory")

        llm._forward = broken
        outs = [out async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=4))]
        assert outs[-1].finish_reason == "error" and "out of memory" in outs[-1].error
        assert engine.is_dead
        with pytest.raises(EngineDeadError):
            await engine.generate([1], SamplingParams()).__anext__()
        await engine.shutdown()

    asyncio.run(main())


def test_a_queue_that_fills_after_the_check_still_refuses_with_queue_full(tokenizer):
    """The race between generate()'s queue check and the worker's add gives 429, not 500."""
    from server.engine import QueueFullError

    async def main():
        llm = make_engine(make_model(), tokenizer)
        engine = AsyncEngine(llm)
        await engine.start()
        real_add = llm.add_request

        def full(request_id, prompt_ids, params):
            raise QueueFullError("256 requests are already waiting; retry later")

        llm.add_request = full
        with pytest.raises(QueueFullError):
            await engine.generate([1, 2, 3], SamplingParams(max_tokens=4)).__anext__()
        llm.add_request = real_add  # the engine goes on serving
        outs = [out async for out in engine.generate([1, 2, 3], SamplingParams(
            max_tokens=4, ignore_eos=True))]  # unseeded: EOS could end it early
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        await engine.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------- paged cache, prefix caching
SHARED = [(13 * i) % 400 + 2 for i in range(40)]  # two full 16-token blocks and a part


def run_arrivals(engine: LLMEngine, arrivals: list[tuple[int, str, list[int], SamplingParams]]):
    """Submit each request before the step numbered in its tuple, step to the end; returns
    request id -> generated ids."""
    got: dict[str, list[int]] = {rid: [] for _, rid, _, _ in arrivals}
    step = 0
    while arrivals or engine.has_unfinished():
        while arrivals and arrivals[0][0] <= step:
            _, rid, prompt, params = arrivals.pop(0)
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            got[out.request_id] += out.token_ids
        step += 1
    return got


def test_prefix_cached_output_equals_uncached(tokenizer, device):
    """A second request sharing a prefix with one still running, a third with one already
    finished, one whose whole prompt is cached (its last token still runs for logits), and
    one asking for prompt logprobs (it skips the cache): same tokens, greedy and seeded,
    with prefix caching on and off; with it on, the cache is hit."""
    model = make_model().to(device)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    arrivals = [(0, "first", SHARED + [5, 6], greedy),
                (2, "beside", SHARED + [9], seeded),  # "first" still decodes
                (30, "after", SHARED + [7, 7, 7], greedy),  # both finished
                (30, "whole", SHARED[:32], seeded),  # every block cached
                (31, "scored", SHARED + [1], SamplingParams(max_tokens=2, temperature=0,
                                                            prompt_logprobs=1))]
    results = {}
    for caching in (True, False):
        engine = make_engine(model, tokenizer, enable_prefix_caching=caching, device=device)
        results[caching] = run_arrivals(engine, list(arrivals))
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks
        # beside and after find 32 tokens, whole 16 (its last block runs); scored skips
        assert stats.prefix_cache_hits == (32 + 32 + 16 if caching else 0)
        assert stats.prefix_cache_queries == (42 + 41 + 43 + 32 if caching else 0)
    assert results[True] == results[False]
    for rid, prompt, params in [(a[1], a[2], a[3]) for a in arrivals if a[3].temperature == 0]:
        assert results[True][rid] == generate(model, prompt, params.max_tokens, temperature=0)


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_give_the_tokens_of_an_uninterrupted_run(tokenizer, caching):
    """A pool of 6 blocks for 3 requests that need 4 each: the youngest are preempted and
    recomputed, greedy and seeded, and give what a roomy pool gives."""
    from server.kv_cache import KVCachePool

    model = make_model()
    prompts = [[(5 * i + 3 * j) % 300 + 1 for j in range(20)] for i in range(3)]
    requests = {f"r{i}": (p, SamplingParams(max_tokens=40, seed=i, ignore_eos=True,
                                            temperature=0.0 if i % 2 else 0.8))
                for i, p in enumerate(prompts)}
    roomy = run_all(make_engine(model, tokenizer, enable_prefix_caching=caching), requests)
    per_block = KVCachePool.bytes_per_token(model.config, torch.float32) * 16
    tight = make_engine(model, tokenizer, kv_cache_gib=6 * per_block / 2**30,
                        enable_prefix_caching=caching)
    squeezed = run_all(tight, requests)
    assert tight.stats().num_preemptions > 0
    assert {r: v[0] for r, v in squeezed.items()} == {r: v[0] for r, v in roomy.items()}
    assert {r: v[1] for r, v in squeezed.items()} == {r: v[1] for r, v in roomy.items()}
    assert tight.stats().num_free_blocks == 6


def test_an_aborted_stream_gives_back_its_blocks_shared_ones_included(tokenizer):
    async def main():
        engine = AsyncEngine(make_engine(make_model(), tokenizer))
        await engine.start()
        params = SamplingParams(max_tokens=80, ignore_eos=True)
        first = engine.generate(SHARED + [1], params, request_id="first")
        await first.__anext__()
        second = engine.generate(SHARED + [2], params, request_id="second")
        await second.__anext__()  # shares first's two cached blocks
        assert engine.stats().prefix_cache_hits == 32
        await second.aclose()
        await first.aclose()
        await engine.shutdown()
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_blocks and stats.kv_cache_usage == 0
        assert stats.num_running == 0

    asyncio.run(main())


def test_prefix_cache_and_preemption_counters_reach_prometheus(tokenizer):
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import ServerMetrics

    engine = make_engine(make_model(), tokenizer)
    metrics = ServerMetrics("m")
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    values = {}
    for rid in ("a", "b"):  # b finds a's two full blocks
        run_all(engine, {rid: (SHARED + [ord(rid)], greedy)})
        metrics.update_from(engine.stats())  # scraped after each: counters add the deltas
        values = {s.name: s.value for f in text_string_to_metric_families(
            metrics.render().decode()) for s in f.samples}
    assert values["vllm:prefix_cache_queries_total"] == 41 * 2
    assert values["vllm:prefix_cache_hits_total"] == 32
    assert values["vllm:num_preemptions_total"] == 0
    assert values["vllm:kv_cache_usage_perc"] == 0


def test_cascade_decode_over_a_shared_prompt_gives_the_uncached_tokens(tokenizer, monkeypatch):
    """Five requests sharing a 70-token prompt (4 full blocks) decode together: with prefix
    caching their rows share those blocks and decode attention runs as cascade (prefix once
    + own blocks, merged); without caching, or when batch-invariant, it runs as one gather.
    Same greedy tokens (fp32), and those of the reference loop."""
    from server import kv_cache
    from server.kv_cache import StepAttention

    # cascade from 4 shared blocks even where the native decode kernel runs (which takes
    # shared prefixes shorter than CASCADE_NATIVE_MIN_TOKENS)
    monkeypatch.setattr(kv_cache, "CASCADE_NATIVE_MIN_TOKENS", 4 * 16)
    calls = []
    cascade = StepAttention._cascade_decode
    monkeypatch.setattr(StepAttention, "_cascade_decode",
                        lambda self, *a: calls.append(len(self.prefix[0])) or cascade(self, *a))
    model = make_model(preset="transformer-test")
    prompt = [(13 * i) % 400 + 2 for i in range(70)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    arrivals = [(0, "first", prompt, greedy)] + [(2, f"r{i}", prompt + [i + 1] * i, greedy)
                                                 for i in range(4)]
    results = {}
    for caching, invariant in [(True, False), (False, False), (True, True)]:
        calls.clear()
        engine = make_engine(model, tokenizer, enable_prefix_caching=caching,
                             batch_invariant=invariant)
        results[caching, invariant] = run_arrivals(engine, list(arrivals))
        assert (max(calls, default=0) == 5) == (caching and not invariant)
    assert results[True, False] == results[False, False] == results[True, True]
    for _, rid, p, _ in arrivals:
        assert results[True, False][rid] == generate(model, p, 10, temperature=0)
