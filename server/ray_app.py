"""`fanformer-serve --ray`: the same FastAPI app and engine, one per Ray Serve replica.

Ray Serve (the optional `ray` extra) does what one process cannot: replicas spread over the
machines of a Ray cluster behind one HTTP endpoint (Ray's proxy), added and removed with the
number of ongoing requests (autoscaling), health-checked and restarted when they die, and
drained before they stop. Each replica loads the model once (server/launch.py's `load`), builds
its own `AsyncEngine` and the very app of server/api.py (`build_app`), so routes, errors and
SSE are the single-process server's; Ray only routes HTTP to it.

What differs from one process, by Ray's design: `/health` and `/metrics` through the endpoint
answer from whichever replica the request lands on (Ray's own per-replica series come from
its metrics agent, docs/SERVING.md says what to scrape); a draining replica is taken out of
routing by Ray rather than answering 503; a replica still busy at `graceful_shutdown_timeout_s`
is killed, so its unfinished streams end without `[DONE]`.

This is the only server module that imports ray; the plain server never does (ruff's banned
import and tests/test_layering.py). server/cli.py checks the flags and calls
`serve_on_ray(args)`; `serve run server.cli:ray_app_builder checkpoint=DIR num_replicas=2`
works too (Ray's application builder, also in server/cli.py). This module imports nothing
from server/cli.py, so there is no import cycle: the shared start-up helpers are
server/launch.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import threading

import ray
from ray import serve

from server.api import ServerSettings, build_app
from server.async_engine import AsyncEngine
from server.engine import EngineConfig, LLMEngine
from server.launch import CLIError, bind, engine_config, load, server_settings

logger = logging.getLogger(__name__)
APP_NAME = "fanformer"


@serve.ingress()  # the app is built per replica, after the model loads (below)
class FanformerReplica:
    """One replica: the model, its engine and the FastAPI app around them."""

    def __init__(self, checkpoint: str | None, engine_config: EngineConfig,
                 settings: ServerSettings, num_threads: int):
        import torch

        torch.set_num_threads(num_threads)  # this replica's share of the node's cores
        model, tokenizer, name = load(checkpoint, engine_config.device, engine_config.dtype)
        self.engine = AsyncEngine(LLMEngine(model, tokenizer, engine_config))
        self.settings = settings if settings.served_model_name else \
            dataclasses.replace(settings, served_model_name=name)

    def __serve_build_asgi_app__(self):
        return build_app(self.engine, self.settings)  # its lifespan starts the engine

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes Ray replace the replica
        (a dead engine never recovers in place)."""
        if self.engine.is_dead:
            raise RuntimeError("the engine has stopped")


def replica_options(args: argparse.Namespace) -> dict:
    """serve.deployment(...) options from the flags: replicas or autoscaling, each replica's
    CPUs (or one GPU), how many requests Ray lets through to it, how long it drains."""
    options = {
        "ray_actor_options": {"num_cpus": args.replica_cpus,
                              "num_gpus": 1 if args.device.startswith("cuda") else 0},
        # Everything the engine would admit (running + waiting) and one more, so a full
        # replica answers 429 itself instead of Ray holding the request in its own queue.
        "max_ongoing_requests": args.max_num_seqs + args.max_queue_len + 1,
        "graceful_shutdown_timeout_s": args.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
    }
    if args.max_replicas is None:
        options["num_replicas"] = args.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": args.min_replicas, "initial_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
        }
    return options


def application(args: argparse.Namespace, **settings: object) -> serve.Application:
    """The bound deployment for serve.run, from fanformer-serve's (checked) flags;
    `settings` overrides ServerSettings fields that have no flag (tests: max_request_bytes)."""
    config = engine_config(args)
    replica_settings = server_settings(args, **settings)  # name "": the checkpoint's
    checkpoint = None if args.checkpoint is None else os.path.abspath(args.checkpoint)
    threads = max(1, math.floor(args.replica_cpus))
    return serve.deployment(FanformerReplica, name="FanformerReplica",
                            **replica_options(args)).bind(checkpoint, config, replica_settings,
                                                          threads)


def check_ray_args(args: argparse.Namespace) -> None:
    if args.port == 0:
        raise CLIError("--ray needs a fixed --port (Ray's proxy cannot pick a free one)")
    if args.replica_cpus <= 0:
        raise CLIError(f"--replica_cpus must be > 0, got {args.replica_cpus}")
    if args.max_replicas is None:
        if args.num_replicas < 1:
            raise CLIError(f"--num_replicas must be at least 1, got {args.num_replicas}")
    elif not 1 <= args.min_replicas <= args.max_replicas:
        raise CLIError(f"need 1 <= --min_replicas <= --max_replicas, got {args.min_replicas} "
                       f"and {args.max_replicas}")
    if args.target_ongoing_requests <= 0:
        raise CLIError(f"--target_ongoing_requests must be > 0, got "
                       f"{args.target_ongoing_requests}")


def serve_on_ray(args: argparse.Namespace) -> None:
    """Start (or join, with --address) a Ray cluster, run the app, wait for SIGTERM or
    Ctrl+C, then delete the app: Ray drains each replica (its graceful shutdown) and the
    engine stops in the app's lifespan."""
    check_ray_args(args)
    bind(args.host, args.port).close()  # a taken port fails here, in a second
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=args.address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=args.log_level == "debug")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise CLIError(f"cannot reach the Ray cluster at {args.address or 'RAY_ADDRESS'}: "
                       f"{str(e).splitlines()[0]}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(args), name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d through Ray Serve (%s cluster); Ctrl+C stops",
                    args.host, args.port, "local" if local else "joined")
        stop.wait()
        logger.info("stopping: Ray drains each replica (up to %.0f s)", args.shutdown_timeout)
        serve.delete(APP_NAME)
    except RuntimeError as e:  # e.g. a replica's constructor failed (Ray retried it)
        raise CLIError(f"Ray Serve could not start the app: {str(e).splitlines()[0]}") from None
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()
