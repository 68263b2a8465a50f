"""`fanformer-serve` (also `python -m server.cli`): load a checkpoint and serve it over HTTP.

With no arguments it serves the demo model on 127.0.0.1:8000. Whether a checkpoint is
quantized is read from the checkpoint (`quant_config.json`), never guessed from its name.
SIGTERM (or Ctrl+C) drains (server/drain.py): new requests get 503, running ones get
`--shutdown_timeout` seconds to finish, then the engine stops and the process exits 0.
The port is bound before the model loads, so a taken port fails at once. Every start-up
failure (a missing checkpoint, a taken port, a bad flag value) is one line on stderr and a
non-zero exit, never a traceback. Slow clients are timed out and open connections capped
(server/connections.py). This module knows the command line and process lifecycle; loading
and binding live in server/launch.py (shared with server/ray_app.py, imported only with --ray),
the routes in server/api.py, the batching in server/engine.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from fanformer.flags import FlagParser, normalize_argv
from server.launch import (
    API_KEY_ENV,
    CLIError,
    bind,
    engine_config,
    freeze_startup_heap,
    load,
    server_settings,
)

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings
logger = logging.getLogger("server")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {port}")
    return port


def build_parser() -> FlagParser:
    from server.engine import EngineConfig  # the defaults come from the engine's config

    engine = EngineConfig()
    p = FlagParser(
        prog="fanformer-serve",
        description="Serve a FANformer checkpoint over an OpenAI-compatible HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /metrics, ...). "
                    "Flags take dashes or underscores; vLLM's names work where the meaning "
                    "is the same.")
    p.add_argument("model", nargs="?", default=None, metavar="CHECKPOINT",
                   help="checkpoint directory, plain or quantized (default: the demo model)")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", default=None,
                   help="the same, as a flag")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = all)")
    p.add_argument("--port", type=_port, default=8000, help="port to bind (0 = any free one)")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, "
                        "else no key)")
    p.add_argument("--device", default=engine.device, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=engine.dtype, choices=DTYPES + tuple(DTYPE_ALIASES),
                   help="weights and activations dtype (auto = bfloat16; half = float16, "
                        "float = float32)")
    p.add_argument("--max_num_seqs", type=int, default=engine.max_num_seqs,
                   help="most sequences in the running batch")
    p.add_argument("--max_model_len", type=int, default=engine.max_model_len,
                   help="longest prompt + completion in tokens (default: the model's context)")
    p.add_argument("--kv_cache_gib", type=float, default=engine.kv_cache_gib,
                   help="memory for the KV cache's blocks in GiB (default: what --max_num_seqs "
                        "sequences of --max_model_len tokens take)")
    p.add_argument("--block_size", type=int, default=engine.block_size,
                   help="tokens per KV cache block")
    p.add_argument("--no_prefix_caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the cached KV blocks of a prompt's prefix (prefix "
                        "caching on unless given: %(default)s)")
    p.add_argument("--max_num_batched_tokens", type=int, default=engine.max_num_batched_tokens,
                   help="tokens per engine step (decodes + prefill chunks)")
    p.add_argument("--max_queue_len", type=int, default=engine.max_queue_len,
                   help="waiting requests beyond this are refused with 429")
    p.add_argument("--batch_invariant", action="store_true",
                   help="quantized layers compute a row the same way at every batch size, so "
                        "a request gives bitwise the same tokens alone and in a crowd (4-bit "
                        "layers of 2^18+ weights then run w8a8 at a few streams too: slower)")
    p.add_argument("--cors_origins", nargs="*", default=[],
                   help="origins allowed by CORS, e.g. '*' or http://localhost:3000")
    p.add_argument("--served_model_name", default=None,
                   help="the model id clients use (default: the checkpoint directory's name)")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish")
    p.add_argument("--timeout_keep_alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--timeout_headers", type=float, default=10.0,
                   help="seconds a client gets to send a request's headers (else 408)")
    p.add_argument("--timeout_body", type=float, default=60.0,
                   help="seconds a client gets to send a request's body after its headers")
    p.add_argument("--max_connections", type=int, default=512,
                   help="open connections at most; beyond it the longest-idle or "
                        "longest-waiting one is closed (keep it under the file limit, "
                        "ulimit -n)")
    p.add_argument("--log_level", "--uvicorn_log_level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    add_ray_flags(p)
    return p


def add_ray_flags(p: FlagParser) -> None:
    """--ray and its flags; server/ray_app.py reads them (and is imported only with --ray)."""
    g = p.add_argument_group("Ray Serve (pip install 'fanformer[ray]'; docs/SERVING.md)")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: replicas behind one endpoint, restarted "
                        "when they die")
    g.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379; default: $RAY_ADDRESS, "
                        "else start a local one)")
    g.add_argument("--num_replicas", type=int, default=1, help="fixed number of replicas")
    g.add_argument("--min_replicas", type=int, default=1, help="autoscaling: fewest replicas")
    g.add_argument("--max_replicas", type=int, default=None,
                   help="autoscaling: most replicas (setting it turns autoscaling on)")
    g.add_argument("--target_ongoing_requests", type=float, default=8.0,
                   help="autoscaling: ongoing requests per replica Ray aims for")
    g.add_argument("--upscale_delay_s", type=float, default=5.0,
                   help="autoscaling: load must stay high this long before a replica is added")
    g.add_argument("--downscale_delay_s", type=float, default=30.0,
                   help="autoscaling: load must stay low this long before one is removed")
    g.add_argument("--replica_cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per replica (fractions allowed); its torch "
                        "threads = the whole part, at least 1")


def check_args(args: argparse.Namespace) -> None:
    """What the parser cannot check, before anything is loaded."""
    if args.model and args.checkpoint and args.model != args.checkpoint:
        raise CLIError(f"two checkpoints given ({args.model} and --checkpoint "
                       f"{args.checkpoint}); pass one")
    args.checkpoint = args.checkpoint or args.model
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    for flag in ("max_num_seqs", "max_num_batched_tokens", "max_queue_len", "max_connections",
                 "block_size"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise CLIError(f"--max_model_len must be at least 1, got {args.max_model_len}")
    if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
        raise CLIError(f"--kv_cache_gib must be > 0, got {args.kv_cache_gib}")
    for flag in ("shutdown_timeout", "timeout_keep_alive", "timeout_headers", "timeout_body"):
        if not getattr(args, flag) >= 0:
            raise CLIError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise CLIError(f"checkpoint directory {args.checkpoint} does not exist")


def describe_quantization(checkpoint: str | Path) -> str:
    """"gptq 4-bit, group size 128" or "not quantized", as quant_config.json says."""
    from fanformer.checkpoint import is_quantized
    from quant.config import QuantConfig

    if not is_quantized(checkpoint):
        return "not quantized"
    qc = QuantConfig.load(checkpoint)
    group = "per row" if qc.group_size == -1 else f"group size {qc.group_size}"
    head = "" if qc.lm_head == "none" else f", {qc.lm_head} LM head"
    return f"{qc.method} {qc.bits}-bit, {group}{head}"


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from fanformer.checkpoint import DEMO_CHECKPOINT
    from server.api import build_app
    from server.async_engine import AsyncEngine
    from server.connections import limits_protocol
    from server.drain import AFTER_ABORT_S, DrainingServer
    from server.engine import LLMEngine

    check_args(args)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    model, tokenizer, name = load(args.checkpoint, args.device, args.dtype)
    config = engine_config(args)
    try:
        llm = LLMEngine(model, tokenizer, config)
        engine = AsyncEngine(llm)
    except ValueError as e:
        raise CLIError(str(e)) from None
    path = args.checkpoint or DEMO_CHECKPOINT
    logger.info("loaded %s (%s, %s on %s); %s, prefix caching %s", path,
                describe_quantization(path), config.dtype, args.device, llm.pool.describe(),
                "on" if config.enable_prefix_caching else "off")
    settings = server_settings(args, name)
    app = build_app(engine, settings)
    logger.info("garbage collector: %d start-up objects frozen", freeze_startup_heap())
    logger.info("serving %r on http://%s:%d", settings.served_model_name, args.host, port)
    # SIGTERM drains (server/drain.py): new requests get 503 while the running ones finish
    uv_config = uvicorn.Config(
        app, host=args.host, port=port, log_level=args.log_level,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=math.ceil(AFTER_ABORT_S) + 1,
        http=limits_protocol(args.timeout_headers, args.timeout_body, args.max_connections))
    server = DrainingServer(uv_config, app.state.drain)
    server.run(sockets=[sock])
    if not server.started:
        raise CLIError("the server failed to start (the log above says why)")


def _ray_app():
    try:
        from server import ray_app
    except ImportError as e:
        raise CLIError(f"--ray needs Ray Serve ({e}); pip install 'fanformer[ray]'") from None
    return ray_app


def serve_on_ray(args: argparse.Namespace) -> None:
    ray_app = _ray_app()
    check_args(args)
    ray_app.serve_on_ray(args)


def ray_app_builder(builder_args: dict[str, str]):
    """For `serve run server.cli:ray_app_builder key=value ...` (Ray's CLI): the keys are
    fanformer-serve's flags (checkpoint=DIR, num_replicas=2, max_replicas=4, ...)."""
    ray_app = _ray_app()
    parser = build_parser()
    args = parser.parse_args(builder_argv(parser, builder_args))
    check_args(args)
    ray_app.check_ray_args(args)
    return ray_app.application(args)


def builder_argv(parser: argparse.ArgumentParser, builder_args: dict[str, str]) -> list[str]:
    """`key=value` pairs as fanformer-serve's argv. A switch (`no_prefix_caching`,
    `batch_invariant`, ...) takes true/false: true gives the bare flag, false leaves it out."""
    argv = []
    for key, value in builder_args.items():
        flag = normalize_argv([f"--{key}"])[0]  # no-prefix-caching as no_prefix_caching
        action = parser._option_string_actions.get(flag)
        if action is not None and action.nargs == 0:  # a switch: no value on the command line
            word = str(value).strip().lower()
            if word in ("1", "true", "yes", "on", ""):
                argv.append(flag)
            elif word not in ("0", "false", "no", "off"):
                parser.error(f"{key} is a switch: give {key}=true or {key}=false, not {value!r}")
            continue
        argv.append(f"{flag}={value}")
    return argv


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where refused or not glibc (musl has none)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(param, value))  # 0 means refused
    except (OSError, AttributeError):
        return False


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=2 would) unless the user set it.

    With the default (8 per core) every thread that allocates (event loop, engine step,
    tokenizer, OpenMP) keeps its own arena of freed blocks, and a long-running server's RSS
    keeps climbing as batch shapes vary; capped, the climb of a 64-client soak was about half
    (docs/RELIABILITY.md "Memory" has the runs and their commands).
    Must run before other threads allocate, so first thing in main(). Returns whether set.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return _mallopt(-8, arenas)  # M_ARENA_MAX


def reuse_freed_blocks(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations under 32 MiB from malloc's heap and keep freed memory there (as
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would), unless the user set either.

    A decode step allocates and frees the same multi-MiB tensors every step (a batch's
    logits and the sampler's fp32 copies: 8 MiB at 64 x 32k). Above glibc's 128 KiB
    threshold each one is a fresh mmap whose pages fault in on first touch, so an
    elementwise pass over them costs about twice a pass over reused memory
    (docs/ENGINE.md "Memory allocator"). Returns whether both were set."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
            or "mmap_threshold" in tunables or "trim_threshold" in tunables):
        return False
    return _mallopt(-3, mmap_threshold) and _mallopt(-1, trim_threshold)  # M_MMAP/M_TRIM


def idle_threads_sleep() -> bool:
    """Let torch's idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE) unless the
    user chose a policy. libgomp's default lets them spin up to 300,000 times first, taking
    the cores from the event loop and the tokenizer between steps, and from anything else
    on the machine: with another busy process, engine steps took 0.7-3.6 s instead of 0.14-
    0.17 s (docs/ENGINE.md "Threads" has that and the quiet-machine runs). libgomp reads it
    once, when torch loads, so first thing in main(). Returns whether it set it."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    reuse_freed_blocks()
    idle_threads_sleep()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.ray:
            serve_on_ray(args)
        else:
            serve(args)
    except CLIError as e:
        print(f"fanformer-serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
