"""What starting a server takes, with or without Ray: load the checkpoint, bind the port,
and the engine's and the HTTP side's settings from fanformer-serve's flags.

Shared by server/cli.py (one process) and server/ray_app.py (one call per Ray replica), so
neither imports the other's module for them (cli.py imports ray_app only with --ray, and
ray_app imports nothing from cli.py). It knows the parsed flags (an argparse.Namespace),
not the parser, and never imports ray, uvicorn or FastAPI. Start-up failures are CLIError:
one line for the user, which both callers print as such.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import socket
from pathlib import Path

API_KEY_ENV = "FANFORMER_API_KEY"


class CLIError(Exception):
    """One line for the user."""


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before the model loads: a taken port fails in a
    second, not after a minute of loading. Not listening yet: until the server is up,
    clients are refused rather than left waiting."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CLIError(f"cannot listen on {host}:{port}: unknown host ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "another process uses it; stop it or choose another --port",
                errno.EACCES: "ports below 1024 need privileges; choose another --port",
                errno.EADDRNOTAVAIL: "that address is not on this machine; check --host",
                }.get(e.errno, "")
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror.lower()}"
                       f"{'; ' + hint if hint else ''}") from None
    sock.set_inheritable(True)
    return sock


def load(checkpoint: str | None, device: str, dtype: str):
    """(model, tokenizer, name) from a plain or quantized checkpoint, or the demo model."""
    from fanformer.checkpoint import DEMO_CHECKPOINT, CheckpointError
    from quant import load_any_checkpoint
    from server.engine import EngineConfig

    if checkpoint is None:
        path, name = DEMO_CHECKPOINT, "fanformer-demo"
        if not (path / "config.json").is_file():
            raise CLIError(f"the demo model is not built yet ({path} is missing); "
                           "pass a checkpoint directory")
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


def freeze_startup_heap() -> int:
    """Take every object alive now (model, tokenizer, engine, app: a few hundred thousand)
    out of the cyclic garbage collector's oldest generation, and return how many.

    Why: a full collection walks every tracked object with the GIL held, so under load it
    stalls the engine and every stream for ~0.2 s (transformer-64m's server: 337k objects,
    one such pause every ~15 s at 64 streams; docs/ENGINE.md "Garbage collection"). What a
    server allocates per request is freed by reference counting; the startup heap lives as
    long as the process. vLLM and SGLang freeze theirs the same way after start-up."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def engine_config(args: argparse.Namespace):
    """The EngineConfig of fanformer-serve's flags (one replica's, with --ray)."""
    from server.engine import EngineConfig

    return EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                        kv_cache_gib=args.kv_cache_gib, block_size=args.block_size,
                        enable_prefix_caching=args.enable_prefix_caching,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_queue_len=args.max_queue_len, device=args.device,
                        dtype=args.dtype, batch_invariant=args.batch_invariant)


def server_settings(args: argparse.Namespace, name: str = "", **extra):
    """The ServerSettings of fanformer-serve's flags; `name` is the served model name when
    --served_model_name is not given ("": the checkpoint's, filled in by the replica, with
    --ray), `extra` sets fields that have no flag (tests: max_request_bytes)."""
    from server.api import ServerSettings

    return ServerSettings(
        served_model_name=args.served_model_name or name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        cors_origins=tuple(args.cors_origins), shutdown_timeout=args.shutdown_timeout,
        **extra)
