"""Quantized checkpoints through the serving engine: the same tokens as the reference loop,
alone and in mixed batches, greedy and seeded, for every method and every CPU kernel
family (the native kernel, aten's weight-only kernels, w8a8), so no request's tokens
depend on the other requests; on CUDA too where there is one (the `device` fixture: there
every layer runs its fallback)."""

from __future__ import annotations

import pytest
import torch

from fanformer.checkpoint import save_checkpoint
from fanformer.generate import generate
from quant import layers as qlayers
from quant import load_any_checkpoint, native_cpu
from quant.cli import main
from server.engine import EngineConfig, LLMEngine
from server.sampling import SamplingParams
from tests.conftest import make_model

FAST = ["--calib_samples", "4", "--calib_seq_len", "32", "--eval_tokens", "0", "--quiet"]
PROMPTS = [[5], [17, 42, 9], [(7 * i) % 500 + 1 for i in range(40)], list(range(3, 20))]
# (method, extra flags, the threshold that picks the kernel family: 1 << 40 keeps every
# layer with a weight-only kernel on it, 0 sends every layer through w8a8; whether the
# native kernel may run: its 4-bit and int8 layers where this CPU runs it, else aten's)
CASES = {
    "rtn+int8-head": ("rtn", ["--lm_head", "int8"], 1 << 40, True),
    "rtn+int8-head aten": ("rtn", ["--lm_head", "int8"], 1 << 40, False),
    "int8": ("int8", [], 1 << 40, True),
    "nf4": ("nf4", [], 1 << 40, True),
    "gptq+int4-head": ("gptq", ["--group_size", "32", "--lm_head", "int4"], 1 << 40, True),
    "awq": ("awq", ["--group_size", "32"], 1 << 40, True),
    "gptq+int4-head w8a8": ("gptq", ["--group_size", "32", "--lm_head", "int4"], 0, False),
    "nf4 w8a8": ("nf4", [], 0, False),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", make_model(), tokenizer)


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, tmp_path_factory, checkpoint):
    """The case's checkpoint directory, with its kernel family in force."""
    method, extra, threshold, native = CASES[request.param]
    out = tmp_path_factory.mktemp("q") / method
    assert main(["--method", method, "--checkpoint", str(checkpoint), "--output", str(out),
                 *FAST, *extra]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qlayers, "W8A8_MIN_WEIGHTS", threshold)
        patch.setattr(qlayers, "int8_gemm_fast", lambda: True)  # the case's kernel family
        if not native:
            patch.setattr(native_cpu, "library", lambda: None)
        # the reference loop runs the layers directly: the same one-kernel policy as the
        # engine's --batch_invariant below
        patch.setattr(qlayers.QuantLinear, "batch_invariant", True)
        yield out


def _run(model, tokenizer, requests, dtype, budget=512):
    """Submit every (prompt, params), step to the end: request id -> generated ids. The
    engine runs where the model is."""
    device = model.embed.weight.device.type
    engine = LLMEngine(model, tokenizer, EngineConfig(dtype=dtype, max_num_seqs=8, device=device,
                                                      max_num_batched_tokens=budget,
                                                      batch_invariant=True))
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return out


def test_greedy_matches_reference_alone_and_batched(quantized, device):
    """fp32 for the unquantized parts: the engine's bf16 attention is not bitwise the
    reference loop's (true of unquantized models too), which can flip near-ties."""
    model, tokenizer = load_any_checkpoint(quantized, device, dtype=torch.float32)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [generate(model, p, 10, temperature=0) for p in PROMPTS]
    for prompt, want in zip(PROMPTS, expected):
        assert _run(model, tokenizer, {"a": (prompt, greedy)}, "float32")["a"] == want
    together = _run(model, tokenizer, {str(i): (p, greedy) for i, p in enumerate(PROMPTS)},
                    "float32", budget=20)
    assert [together[str(i)] for i in range(len(PROMPTS))] == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_seeded_sampling_alone_equals_in_a_crowd(quantized, dtype, device):
    """A seeded request gives the same tokens alone and among other requests whose prefill
    chunks and decode rows share its steps (the issue: bf16, the serving dtype); in fp32
    they are also the reference loop's tokens."""
    model, tokenizer = load_any_checkpoint(quantized, device, dtype=getattr(torch, dtype))
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=1234,
                            ignore_eos=True)
    alone = _run(model, tokenizer, {"x": (PROMPTS[1], params)}, dtype)["x"]
    others = {f"o{i}": (p, SamplingParams(max_tokens=7, temperature=1.0, seed=i))
              for i, p in enumerate(PROMPTS)}
    for budget in (20, 512):  # prefill chunks mixed with decode rows; whole prompts
        crowd = _run(model, tokenizer, {**others, "x": (PROMPTS[1], params)}, dtype, budget)
        assert crowd["x"] == alone, budget
    if dtype == "float32":
        assert alone == generate(model, PROMPTS[1], 10, temperature=0.9, top_k=50, top_p=0.9,
                                 generator=torch.Generator(device).manual_seed(1234))


@pytest.mark.parametrize("invariant", [False, True])
def test_engine_sets_batch_invariant_on_every_quantized_layer(quantized, invariant):
    """LLMEngine copies EngineConfig.batch_invariant onto each QuantLinear instance (the
    fixture's class-level True is only the reference loop's policy): False overrides it."""
    model, tokenizer = load_any_checkpoint(quantized, "cpu", dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, qlayers.QuantLinear)]
    assert layers and not any("batch_invariant" in vars(m) for m in layers)
    LLMEngine(model, tokenizer, EngineConfig(dtype="float32", max_num_seqs=1,
                                             batch_invariant=invariant))
    built = [set(m._kernels) for m in layers]  # before kernel_name, which builds some
    assert [vars(m)["batch_invariant"] for m in layers] == [invariant] * len(layers)
    assert all(m.batch_invariant is invariant for m in layers)
    # and builds each layer's one-row (decode) kernel before any request
    assert all(m.kernel_name(1) in b for m, b in zip(layers, built))
