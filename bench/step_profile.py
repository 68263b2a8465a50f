"""Where the time of one engine decode step goes: forward (and within it the linears),
sampling, and the rest (scheduling, detokenization, outputs).

For each batch size and sampling mode the engine decodes `batch` requests (64-token prompts,
random weights, EOS ignored); after the prompts are in, `--steps` decode steps are timed
one by one, with the forward and the sampler timed inside each step. The linear-only time
is every leaf linear of the model run once on a (batch, d_in) input in the model's dtype, on
the engine's thread count for that batch (a step can be no faster than that), timed in
groups alternating with the steps'. Medians; run it on an idle machine (`uptime` is
printed) and compare figures of one run only.

    .venv/bin/python bench/step_profile.py --preset transformer-64m --batch 1 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_engine import build_model, byte_tokenizer, start_decoding

import server.engine as engine_module
from quant import native_cpu
from quant.convert import load_any_checkpoint
from quant.layers import QuantLinear
from server.engine import EngineConfig, LLMEngine
from server.kv_cache import KVCachePool
from server.native_step import NativeDecodeStep
from server.sampling import SamplingParams

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_p=0.95)}


class Timer:
    """Wraps a callable and records the wall time of each call."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - start)


def native_linears(model, batch: int) -> bool:
    """Whether the engine's native decode step runs this model's bf16 linears on its own
    C kernel at `batch` rows (server/native_step.py: fused with bf16 linears), asked of the
    step itself, built on a pool of two blocks."""
    pool = KVCachePool(model.config, 2, 16, torch.bfloat16, "cpu")
    step = NativeDecodeStep.build(model, pool)
    return step is not None and step.fused and step.dense and batch <= step.fused_max_rows


class LinearsAlone:
    """Every leaf linear of the model run once on a (batch, d_in) input in the model's
    dtype, on the engine's thread count for that batch: a step can be no faster. With
    `native`, the bf16 nn.Linears run on the C kernel the fused native step runs them on
    (quant.native_cpu.bf16_linear), as they do in such a step."""

    def __init__(self, model, batch: int, dtype: torch.dtype, native: bool = False):
        self.leaves = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
        self.inputs = [torch.randn(batch, m.in_features, dtype=dtype)  # (B, d_in)
                       for m in self.leaves]
        self.batch, self.times, self.native = batch, [], native

    @property
    def threads(self) -> int:
        """The engine's thread count for a step of `batch` tokens (server/engine.py)."""
        single = self.batch <= engine_module.SINGLE_THREAD_MAX_TOKENS
        return 1 if single else torch.get_num_threads()

    @torch.inference_mode()
    def __call__(self) -> None:
        default = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            start = time.perf_counter()
            for m, x in zip(self.leaves, self.inputs):
                if self.native and isinstance(m, torch.nn.Linear):
                    native_cpu.bf16_linear(x, m.weight, m.bias)
                else:
                    m(x)
            self.times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(default)


def profile(model, batch: int, mode: str, steps: int, fp32_logits: bool = False,
            group: int = 4) -> dict:
    """`steps` engine steps and as many passes of the linears alone, alternating in groups
    of `group`, so both see the same minutes: this machine's memory speed drifts by tens
    of percent within a minute, more than the step's overhead being measured."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # not the engine's auto
    engine = LLMEngine(model, byte_tokenizer(), EngineConfig(max_num_seqs=max(batch, 1),
                                                             fp32_logits=fp32_logits,
                                                             dtype=dtype))
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, seed=0, **MODES[mode])
    start_decoding(engine, batch, params)
    # after the engine's start: its bf16 CPU linears (server/cpu_linear.py) are the ones run
    step = engine.native_step
    native = step is not None and step.fused and step.dense and batch <= step.fused_max_rows
    linears = LinearsAlone(model, batch, getattr(torch, dtype), native)
    for _ in range(3):
        linears()
    linears.times.clear()
    # the sampler the engine calls (`sample_batch` before engine v2: for before/after runs)
    name = "sample" if hasattr(engine_module, "sample") else "sample_batch"
    forward, sampler = Timer(engine._forward), Timer(getattr(engine_module, name))
    engine._forward = forward
    setattr(engine_module, name, sampler)
    try:
        step_times = []
        for i in range(steps):
            start = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - start)
            if i % group == group - 1 or i == steps - 1:
                for _ in range(min(group, steps - len(linears.times))):
                    linears()
    finally:
        setattr(engine_module, name, sampler.fn)
    ms = lambda xs: statistics.median(xs) * 1e3
    step, fwd, smp = ms(step_times), ms(forward.times), ms(sampler.times)
    return {"step_ms": step, "forward_ms": fwd, "sampler_ms": smp, "linears_ms": ms(linears.times),
            "rest_ms": step - fwd - smp, "tok_s": batch / step * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="transformer-64m")
    p.add_argument("--checkpoint", default=None,
                   help="profile this checkpoint's model, plain or quantized (e.g. "
                        "fanformer/assets/demo) instead of a random --preset")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--single_thread_max", type=int, default=None,
                   help="override the engine's SINGLE_THREAD_MAX_TOKENS (steps of at most "
                        "this many tokens run on one thread)")
    p.add_argument("--fp32_logits", action="store_true",
                   help="the LM head in fp32 (EngineConfig.fp32_logits)")
    args = p.parse_args()
    if args.single_thread_max is not None:
        engine_module.SINGLE_THREAD_MAX_TOKENS = args.single_thread_max
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        model = load_any_checkpoint(args.checkpoint, dtype=dtype)[0].eval()
    else:
        model = build_model(args.preset, dtype)
    print(f"# {args.checkpoint or args.preset} {args.dtype}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| batch | mode | step ms | forward ms | linears alone ms | sampler ms | rest ms "
          "| tok/s | linears / step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for mode in MODES:
            r = profile(model, batch, mode, args.steps, args.fp32_logits)
            print(f"| {batch} | {mode} | {r['step_ms']:.1f} | {r['forward_ms']:.1f} "
                  f"| {r['linears_ms']:.1f} | {r['sampler_ms']:.1f} | {r['rest_ms']:.1f} "
                  f"| {r['tok_s']:.0f} | {r['linears_ms'] / r['step_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
