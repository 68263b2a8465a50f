"""`fanformer-serve` (also `python -m server.cli`): load a checkpoint and serve it over HTTP.

With no arguments it serves the demo model on 127.0.0.1:8000. Whether a checkpoint is
quantized is read from the checkpoint (`quant_config.json`), never guessed from its name.
SIGTERM (or Ctrl+C) drains (server/drain.py): new requests get 503, running ones get
`--shutdown_timeout` seconds to finish, then the engine stops and the process exits 0.
Bad input (a missing checkpoint, a bad flag value) is one line on stderr and exit status 1,
never a traceback. This module knows the command line and process lifecycle; the routes live
in server/api.py, the batching in server/engine.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

API_KEY_ENV = "FANFORMER_API_KEY"
DTYPES = ("auto", "bfloat16", "float16", "float32")


class CLIError(Exception):
    """One line for the user."""


def build_parser() -> argparse.ArgumentParser:
    from server.engine import EngineConfig  # the defaults come from the engine's config

    engine = EngineConfig()
    p = argparse.ArgumentParser(
        prog="fanformer-serve",
        description="Serve a FANformer checkpoint over an OpenAI-compatible HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /metrics, ...).")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory, plain or quantized (default: the demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0 = any free one)")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}, "
                        "else no key)")
    p.add_argument("--device", default=engine.device, help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=engine.dtype, choices=DTYPES,
                   help="weights and activations dtype (auto = bfloat16)")
    p.add_argument("--max_num_seqs", type=int, default=engine.max_num_seqs,
                   help="most sequences in the running batch (= KV cache slots)")
    p.add_argument("--max_model_len", type=int, default=engine.max_model_len,
                   help="longest prompt + completion in tokens (default: the model's context)")
    p.add_argument("--kv_cache_gib", type=float, default=engine.kv_cache_gib,
                   help="memory budget for the KV cache in GiB: slots = what fits, at most "
                        "--max_num_seqs (default: --max_num_seqs slots)")
    p.add_argument("--max_num_batched_tokens", type=int, default=engine.max_num_batched_tokens,
                   help="tokens per engine step (decodes + prefill chunks)")
    p.add_argument("--max_queue_len", type=int, default=engine.max_queue_len,
                   help="waiting requests beyond this are refused with 429")
    p.add_argument("--cors_origins", nargs="*", default=[],
                   help="origins allowed by CORS, e.g. '*' or http://localhost:3000")
    p.add_argument("--served_model_name", default=None,
                   help="the model id clients use (default: the checkpoint directory's name)")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish")
    p.add_argument("--log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def load(checkpoint: str | None, device: str, dtype: str):
    """(model, tokenizer, name) from a plain or quantized checkpoint, or the demo model."""
    from fanformer.checkpoint import DEMO_CHECKPOINT, CheckpointError
    from quant import load_any_checkpoint
    from server.engine import EngineConfig

    if checkpoint is None:
        path, name = DEMO_CHECKPOINT, "fanformer-demo"
        if not (path / "config.json").is_file():
            raise CLIError(f"the demo model is not built yet ({path} is missing); "
                           "pass --checkpoint DIR")
    else:
        path = Path(checkpoint)
        name = path.resolve().name
    try:
        # plain or quantized, as quant_config.json says
        torch_dtype = EngineConfig(dtype=dtype).torch_dtype()
        model, tokenizer = load_any_checkpoint(path, device, torch_dtype)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except (RuntimeError, AssertionError) as e:  # e.g. CUDA asked for but not available
        raise CLIError(f"cannot load {path} on {device}: {str(e).splitlines()[0]}") from None
    return model, tokenizer, name


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.api import ServerSettings, build_app
    from server.drain import AFTER_ABORT_S, DrainingServer
    from server.engine import AsyncEngine, EngineConfig, LLMEngine

    for flag in ("max_num_seqs", "max_num_batched_tokens", "max_queue_len"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
        raise CLIError(f"--kv_cache_gib must be > 0, got {args.kv_cache_gib}")
    if args.shutdown_timeout < 0:
        raise CLIError(f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    model, tokenizer, name = load(args.checkpoint, args.device, args.dtype)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          kv_cache_gib=args.kv_cache_gib,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_queue_len=args.max_queue_len, device=args.device,
                          dtype=args.dtype)
    try:
        engine = AsyncEngine(LLMEngine(model, tokenizer, config))
    except ValueError as e:
        raise CLIError(str(e)) from None
    settings = ServerSettings(
        served_model_name=args.served_model_name or name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        cors_origins=tuple(args.cors_origins), shutdown_timeout=args.shutdown_timeout)
    app = build_app(engine, settings)
    logging.getLogger("server").info("serving %s as %r on http://%s:%d", args.checkpoint or
                                     "the demo model", settings.served_model_name, args.host,
                                     args.port)
    # SIGTERM drains (server/drain.py): new requests get 503 while the running ones finish
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=math.ceil(AFTER_ABORT_S) + 1)
    DrainingServer(config, app.state.drain).run()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=2 would) unless the user set it.

    With the default (8 per core) every thread that allocates (event loop, engine step,
    tokenizer, OpenMP) keeps its own arena of freed blocks, and a long-running server's RSS
    keeps climbing as batch shapes vary; capped, the climb of a 64-client soak was about half
    (docs/RELIABILITY.md "Memory" has the runs and their commands).
    Must run before other threads allocate, so first thing in main(). Returns whether set.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, arenas))  # -8 is M_ARENA_MAX; 0 means refused
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to do
        return False


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except CLIError as e:
        print(f"fanformer-serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
