"""The generation engine: continuous batching over a paged KV cache (synchronous core).

`LLMEngine.step` reads like vLLM's: plan = scheduler.schedule() -> one forward over the
flattened batch (decode tokens and prefill chunks together) -> sample -> update. It owns
the KV cache pool (blocks, prefix cache), each request's sampler state and incremental
detokenizer, and turns them into `RequestOutput`s. An exception while handling one request
finishes that request alone with "error"; an exception in the batched forward propagates
(the async front then declares the engine dead). The async front lives in
server/async_engine.py and is re-exported here. This module deals in token ids and
`SamplingParams`; it knows nothing of HTTP. server/api.py (through AsyncEngine),
server/generate_cli.py and the tests call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fanformer.tokenizer import Tokenizer
from server.block_pool import BlockPool
from server.cpu_linear import use_cpu_linears
from server.detokenizer import IncrementalDetokenizer
from server.kv_cache import KVCachePool, Segment, StepAttention, to_device
from server.native_step import NativeDecodeStep
from server.outputs import (  # noqa: F401 - the engine's errors, importable from here
    EngineDeadError,
    EngineError,
    EngineStats,
    QueueFullError,
    RequestOutput,
    RequestTooLongError,
    TokenLogprob,
)
from server.request import Request
from server.sampling import SamplingParams, sample, top_logprobs
from server.scheduler import Scheduler, SchedulerPlan

logger = logging.getLogger(__name__)

# On CPU, a step of at most this many tokens runs on one thread. 0: none do. It was 16
# while idle OpenMP threads spun (libgomp's default) and took the cores from the event
# loop; with them sleeping (fanformer-serve sets OMP_WAIT_POLICY=PASSIVE) the batch-1 GEMVs
# run twice as fast on both cores, and through HTTP 2 threads gave 38 / 375 / 691 tok/s at
# 1 / 16 / 64 greedy streams against 30 / 291 / 647 (transformer-64m, 2-core machine,
# bench/omp_wait.py, docs/ENGINE.md "Threads"). A many-core machine may want it back.
SINGLE_THREAD_MAX_TOKENS = 0

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # running sequences at most
    max_model_len: int | None = None  # default: the model's max_seq_len
    kv_cache_gib: float | None = None  # memory for the KV cache's blocks (default: what
    #   max_num_seqs sequences of max_model_len tokens take, the footprint of the slot cache
    #   this replaced; short sequences then leave room for more, up to max_num_seqs)
    block_size: int = 16  # tokens per KV cache block
    enable_prefix_caching: bool = True  # reuse the cached blocks of a prompt's prefix
    max_num_batched_tokens: int = 512  # per-step token budget (decodes + prefill chunks)
    enable_chunked_prefill: bool = True
    max_queue_len: int = 256  # waiting requests beyond this are refused (QueueFullError)
    device: str = "cpu"
    dtype: str = "auto"  # auto = bfloat16 (CPU and CUDA); float32 and float16 also allowed
    batch_invariant: bool = False  # quantized layers: one kernel at every batch size, so a
    #   request gives bitwise the same tokens alone and in a crowd (4-bit: slower at few rows);
    #   also turns off cascade decode over a shared prefix (server/kv_cache.py)
    fp32_logits: bool | None = None  # the LM head in fp32 (no bf16 ties); default: on CUDA
    #   only: on CPU an fp32 head cost 5x the bf16 one (32 vs 6 ms a step at batch 64, 32k
    #   vocabulary), a third of the step, so there the bf16 logits are cast to fp32 instead

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, "
                             f"got {self.dtype!r}")
        return DTYPES[self.dtype]


class LLMEngine:
    """add_request / abort / step; everything runs in the caller's thread."""

    def __init__(self, model, tokenizer: Tokenizer, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.config = config
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.max_model_len = config.max_model_len or model.config.max_seq_len
        problems = []
        if config.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {config.max_num_seqs}")
        if not 1 <= self.max_model_len <= model.config.max_seq_len:
            problems.append(f"max_model_len must be in [1, {model.config.max_seq_len}] "
                            f"(the model's context), got {self.max_model_len}")
        if config.max_num_batched_tokens < 1:
            problems.append(f"max_num_batched_tokens must be >= 1, "
                            f"got {config.max_num_batched_tokens}")
        if config.block_size < 1:
            problems.append(f"block_size must be >= 1, got {config.block_size}")
        if config.kv_cache_gib is not None and config.kv_cache_gib <= 0:
            problems.append(f"kv_cache_gib must be > 0, got {config.kv_cache_gib}")
        if config.max_queue_len < 0:
            problems.append(f"max_queue_len must be >= 0, got {config.max_queue_len}")
        if problems:
            raise ValueError("invalid EngineConfig: " + "; ".join(problems))
        self.device = torch.device(config.device)
        self.max_threads = torch.get_num_threads()
        self.dtype = config.torch_dtype()
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if hasattr(self.model, "reset_buffers"):
            self.model.reset_buffers(self.device)  # the RoPE table stays fp32
        use_cpu_linears(self.model, config.batch_invariant)  # bf16 CPU linears: GEMV, fp32
        bs = config.block_size
        num_blocks = config.max_num_seqs * -(-self.max_model_len // bs)
        if config.kv_cache_gib is not None:
            per_block = KVCachePool.bytes_per_token(model.config, self.dtype) * bs
            num_blocks = int(config.kv_cache_gib * 2**30 // per_block)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_gib={config.kv_cache_gib} holds no KV block of "
                                 f"{bs} tokens ({per_block / 2**20:.2f} MiB each)")
        if num_blocks * bs < self.max_model_len:
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len=%d: "
                           "longer requests are refused", num_blocks * bs, self.max_model_len)
        self.pool = KVCachePool(model.config, num_blocks, bs, self.dtype, self.device)
        logger.info("%s", self.pool.describe())
        self.blocks = BlockPool(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.num_steps = 0
        self.vocab_size = model.config.vocab_size
        fp32_logits = config.fp32_logits
        if fp32_logits is None:
            fp32_logits = self.device.type == "cuda"
        for module in self.model.modules():  # quantized layers (quant/layers.py) have it
            if hasattr(module, "batch_invariant"):
                module.batch_invariant = config.batch_invariant
                if self.device.type == "cpu":
                    module.prepare(1)  # the decode step's kernel, built before any request
        head = self.model.lm_head
        # a quantized head (a drop-in module, not an nn.Linear) keeps its own kernel
        self.head_fp32 = head.weight.float() if fp32_logits and isinstance(head, nn.Linear) \
            else None  # (padded vocab, d)
        # small decode steps in C (server/native_step.py); not when batch-invariant: larger
        # steps run the eager model, whose bits may differ in the last place
        self.native_step = NativeDecodeStep.build(self.model, self.pool) if (
            self.device.type == "cpu" and not config.batch_invariant) else None

    # ---- requests ----
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError / RequestTooLongError for a request that can never run."""
        params.validate(self.vocab_size)
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestTooLongError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the maximum context length of {self.max_model_len} tokens; "
                "shorten the prompt or lower max_tokens")
        if self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.num_blocks:
            raise RequestTooLongError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"does not fit the KV cache ({self.blocks.num_blocks * self.blocks.block_size} "
                "tokens); shorten the prompt or lower max_tokens")

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> None:
        self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_queue_len:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are already "
                                 "waiting; retry later")
        detok = IncrementalDetokenizer(self.tokenizer, params.stop,
                                       params.include_stop_str_in_output,
                                       params.skip_special_tokens, params.min_tokens)
        self.scheduler.add(Request.create(request_id, prompt_ids, params,
                                          self.tokenizer.eos_id, self.device, detok))

    def abort(self, request_id: str) -> None:
        """Finish a request now and give its KV blocks back; unknown ids are ignored."""
        request = self.scheduler.by_id.get(request_id)
        if request is not None:
            self.scheduler.finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        s, b = self.scheduler, self.blocks
        return EngineStats(len(s.running), len(s.waiting), b.usage, b.num_free, b.num_blocks,
                           self.num_steps, b.queries, b.hits, s.num_preemptions)

    # ---- one step ----
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            return []
        self.num_steps += 1
        logits, rows = self._forward(plan)
        self.scheduler.update(plan)
        return self._postprocess(plan, logits, rows)

    def _forward(self, plan: SchedulerPlan) -> tuple[torch.Tensor, list[list[int]]]:
        """One forward over the plan's tokens -> logits of the rows that need them,
        and for each chunk the indices (into those logits) of its rows."""
        ids = [c.request.token_at(c.start + i) for c in plan.chunks for i in range(c.length)]
        segments = [Segment(c.request.blocks.block_ids, c.start, c.length)
                    for c in plan.chunks]
        native = self.native_step is not None and \
            self.native_step.takes(segments, self.pool.block_size)
        # cascade decode changes a row's bits with its neighbours: not when batch-invariant;
        # the native step reads each token's blocks through the plain (non-cascade) tables
        attention = StepAttention(self.pool, segments,
                                  cascade=not (self.config.batch_invariant or native),
                                  every_token_a_row=native)
        wanted: list[int] = []  # batch indices whose logits we compute
        rows: list[list[int]] = []
        offset = 0
        for c in plan.chunks:
            chunk_rows = []
            if c.request.needs_prompt_logprobs and c.start < len(c.request.prompt_ids):
                chunk_rows = list(range(offset, offset + c.length))  # every prompt position
            elif c.samples:
                chunk_rows = [offset + c.length - 1]
            rows.append(list(range(len(wanted), len(wanted) + len(chunk_rows))))
            wanted.extend(chunk_rows)
            offset += c.length
        if self.device.type == "cpu":
            threads = 1 if len(ids) <= SINGLE_THREAD_MAX_TOKENS else self.max_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        model = self.model
        input_ids = to_device(ids, self.device)[None]  # (1, N)
        if native:  # (it raises if the step's attention was not planned for it)
            hidden = self.native_step(input_ids[0], attention)[None]  # (1, N, d)
        else:
            hidden = model.hidden_states(input_ids, attention.positions, attention)  # (1, N, d)
        # the LM head only on the rows we sample from (or score): the model's forward would
        # run it over every prefill token
        h = hidden[0, to_device(wanted, self.device)]  # (R, d)
        if self.head_fp32 is not None:
            logits = F.linear(h.float(), self.head_fp32)  # (R, padded vocab), fp32
        elif native:
            logits = self.native_step.logits(h)  # (R, padded vocab), the model's dtype
        else:
            logits = model.lm_head(h)  # (R, padded vocab), the model's dtype
        return logits[:, : self.vocab_size], rows

    def _postprocess(self, plan: SchedulerPlan, logits: torch.Tensor,
                     rows: list[list[int]]) -> list[RequestOutput]:
        sampling = [(c, r[-1]) for c, r in zip(plan.chunks, rows)
                    if c.samples and c.request.params.max_tokens > 0]
        tokens = sample(logits[[r for _, r in sampling]],
                        [c.request for c, _ in sampling]) if sampling else []
        token_of = {id(c): t for (c, _), t in zip(sampling, tokens)}
        logprobs = None
        if any(c.request.params.logprobs is not None or c.request.prompt_logprobs is not None
               for c in plan.chunks):
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, vocab), raw model
        outputs = []
        for chunk, chunk_rows in zip(plan.chunks, rows):
            request = chunk.request
            if request.finished:
                continue
            try:
                out = self._advance(chunk, chunk_rows, token_of.get(id(chunk)), logprobs)
            except Exception as e:  # noqa: BLE001 - one request fails, the batch goes on
                logger.exception("request %s failed", request.request_id)
                self.scheduler.finish(request, "error")
                out = self._output(request, "", [], None, error=f"{type(e).__name__}: {e}")
            if out is not None:
                outputs.append(out)
        return outputs

    def _advance(self, chunk, chunk_rows, token, logprobs) -> RequestOutput | None:
        request: Request = chunk.request
        params = request.params
        if isinstance(token, Exception):
            raise token
        if request.needs_prompt_logprobs and chunk.start < len(request.prompt_ids):
            self._add_prompt_logprobs(request, chunk, chunk_rows, logprobs)
        if not chunk.samples:
            return None  # a prefill chunk in the middle of the prompt
        if params.max_tokens == 0:  # echo scoring only
            self.scheduler.finish(request, "length")
            return self._output(request, "", [], None)
        request.append(token)
        token_logprobs = None
        if params.logprobs is not None:
            row = chunk_rows[-1]
            (lp, top), = top_logprobs(logprobs[row: row + 1],
                                      torch.tensor([token], device=logprobs.device),
                                      params.logprobs)
            token_logprobs = [TokenLogprob(token, lp, top)]
        is_stop_id = token in request.stop_ids  # masked by the sampler before min_tokens
        hide = is_stop_id and not params.include_stop_str_in_output
        text = request.detok.add_token(token, visible=not hide)
        reason = None
        if request.detok.stopped or is_stop_id:
            reason = "stop"
        elif len(request.output_ids) >= params.max_tokens:
            reason = "length"
        if reason is not None:
            if not request.detok.stopped:
                text += request.detok.flush()
            self.scheduler.finish(request, reason)
        return self._output(request, text, [token], token_logprobs)

    def _add_prompt_logprobs(self, request, chunk, chunk_rows, logprobs) -> None:
        """Logits at prompt position p score prompt token p + 1 (the chunk's rows are its
        positions; positions scored before a preemption are not scored again)."""
        n_prompt, done = len(request.prompt_ids), len(request.prompt_logprobs)
        targets = [p + 1 for p in range(chunk.start, chunk.start + chunk.length)
                   if done <= p + 1 < n_prompt]
        if not targets:
            return
        ids = torch.tensor([request.prompt_ids[t] for t in targets], device=logprobs.device)
        picked = logprobs[[chunk_rows[t - 1 - chunk.start] for t in targets]]
        for t, (lp, top) in zip(targets, top_logprobs(picked, ids, request.params.prompt_logprobs)):
            request.prompt_logprobs.append(TokenLogprob(request.prompt_ids[t], lp, top))

    def _output(self, request: Request, text: str, token_ids: list[int],
                logprobs: list[TokenLogprob] | None, error: str | None = None) -> RequestOutput:
        prompt_logprobs = None
        if not request.sent_first:
            request.sent_first = True
            prompt_logprobs = request.prompt_logprobs
        if request.params.logprobs is not None and logprobs is None:
            logprobs = []
        return RequestOutput(request.request_id, text, token_ids, logprobs, request.prompt_ids,
                             prompt_logprobs, len(request.output_ids), request.finished,
                             request.finish_reason, error)

