"""`fanformer-serve --ray`: the same FastAPI app and engine, one per Ray Serve replica.

Ray Serve (the optional `ray` extra) does what one process cannot: replicas spread over the
machines of a Ray cluster behind one HTTP endpoint (Ray's proxy), added and removed with the
number of ongoing requests (autoscaling), health-checked and restarted when they die, and
drained before they stop. Each replica loads the model once (server/launch.py's `load`), builds
its own `AsyncEngine` and the very app of server/api.py (`build_app`), so routes, errors and
SSE are the single-process server's; Ray only routes HTTP to it.

Stopping drains as one process does. Ray Serve gives user code no hook when a replica's
graceful shutdown begins (it calls `__del__` only once nothing is ongoing, and kills a
replica still busy at `graceful_shutdown_timeout_s`, cutting its streams), so on SIGTERM
fanformer-serve drains its replicas itself before deleting the app: a `DrainSignal` actor
tells every replica at once; each one's server/drain.py `Drain` then refuses new requests
with 503 (`/health` too), lets running ones finish, aborts what still runs at
`--shutdown_timeout` (an error event, then [DONE]) and reports back; then the app is deleted
with nothing left to cut. Stops Ray starts by itself (downscaling, a redeploy, a node
drained) get Ray's behaviour: the replica is taken out of routing (no 503s) and killed if
still busy at `graceful_shutdown_timeout_s`. `/health` and `/metrics` through the endpoint
answer from whichever replica the request lands on (Ray's own per-replica series come from
its metrics agent; docs/SERVING.md says what to scrape).

This is the only server module that imports ray; the plain server never does (ruff's banned
import and tests/test_layering.py). server/cli.py checks the flags and calls
`serve_on_ray(args)`; `serve run server.cli:ray_app_builder checkpoint=DIR num_replicas=2`
works too (Ray's application builder, also in server/cli.py). This module imports nothing
from server/cli.py, so there is no import cycle: the shared start-up helpers are
server/launch.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import signal
import threading
import time

import ray
from ray import serve

from server.api import ServerSettings, build_app
from server.async_engine import AsyncEngine
from server.drain import AFTER_ABORT_S, Drain
from server.engine import EngineConfig, LLMEngine
from server.launch import CLIError, bind, engine_config, freeze_startup_heap, load, server_settings

logger = logging.getLogger(__name__)
APP_NAME = "fanformer"
DEPLOYMENT = "FanformerReplica"
POLL_S = 0.1  # how often a draining replica looks at its requests in flight


@ray.remote(num_cpus=0)
class DrainSignal:
    """fanformer-serve's SIGTERM, told to every replica of its app at once (Ray's handles
    reach one replica per call). Replicas wait on it from start-up and report when drained;
    one replaced during the drain finds it begun and reports at once. Owned by the command:
    if it dies, its replicas' waits fail and they keep serving (Ray's stop rules apply)."""

    def __init__(self):
        self._begun = asyncio.Event()
        self._pending: set[str] = set()  # replica tags not drained yet

    async def wait_for_drain(self, replica: str) -> None:
        self._pending.add(replica)
        await self._begun.wait()

    def begin(self) -> None:
        self._begun.set()

    def drained(self, replica: str) -> None:
        self._pending.discard(replica)

    def pending(self) -> int:
        return len(self._pending)


@serve.ingress()  # the app is built per replica, after the model loads (below)
class FanformerReplica:
    """One replica: the model, its engine and the FastAPI app around them."""

    def __init__(self, checkpoint: str | None, engine_config: EngineConfig,
                 settings: ServerSettings, num_threads: int, drain_signal=None):
        import torch

        torch.set_num_threads(num_threads)  # this replica's share of the node's cores
        model, tokenizer, name = load(checkpoint, engine_config.device, engine_config.dtype)
        self.engine = AsyncEngine(LLMEngine(model, tokenizer, engine_config))
        self.settings = settings if settings.served_model_name else \
            dataclasses.replace(settings, served_model_name=name)
        # _drain_task: held only so the loop's weak reference is not the task's last one
        self.drain_signal, self._drain_task = drain_signal, None

    def __serve_build_asgi_app__(self):
        app = build_app(self.engine, self.settings)  # its lifespan starts the engine
        freeze_startup_heap()  # as fanformer-serve does once its app is built
        if self.drain_signal is not None:  # Ray calls this on the loop that serves the app
            self._drain_task = asyncio.get_running_loop().create_task(
                self._drain_when_told(app.state.drain))
        return app

    async def _drain_when_told(self, drain: Drain) -> None:
        tag = serve.get_replica_context().replica_tag
        try:
            await self.drain_signal.wait_for_drain.remote(tag)
        except ray.exceptions.RayActorError:  # fanformer-serve is gone: Ray's rules apply
            return
        await drain.run(POLL_S)
        logger.info("replica %s drained in %.1f s", tag, drain.elapsed())
        await self.drain_signal.drained.remote(tag)

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
        # for stops Ray starts itself; fanformer-serve's SIGTERM drains before it deletes
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


def application(args: argparse.Namespace, drain_signal=None,
                **settings: object) -> serve.Application:
    """The bound deployment for serve.run, from fanformer-serve's (checked) flags;
    `drain_signal` a DrainSignal actor (None: Ray's stop rules only, as under `serve run`),
    `settings` overrides ServerSettings fields that have no flag (tests: max_request_bytes)."""
    config = engine_config(args)
    replica_settings = server_settings(args, **settings)  # name "": the checkpoint's
    checkpoint = None if args.checkpoint is None else os.path.abspath(args.checkpoint)
    threads = max(1, math.floor(args.replica_cpus))
    return serve.deployment(FanformerReplica, name=DEPLOYMENT, **replica_options(args)).bind(
        checkpoint, config, replica_settings, threads, drain_signal)


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


def drain_replicas(drain_signal, timeout_s: float, skip: threading.Event | None = None) -> int:
    """Tell every replica to drain and wait until each has reported (bounded: the drain's
    timeout, the abort's grace and a margin; `skip` set ends the wait early, as a second
    signal does in one process). Returns how many replicas never reported (e.g. killed
    meanwhile)."""
    skip = threading.Event() if skip is None else skip  # never set: the wait is the poll's pause
    ray.get(drain_signal.begin.remote())
    bound = time.monotonic() + timeout_s + AFTER_ABORT_S + 5.0
    while (left := ray.get(drain_signal.pending.remote())) and time.monotonic() < bound:
        if skip.wait(0.2):
            logger.warning("second signal: stopping without waiting for the drain")
            break
    return left


def serve_on_ray(args: argparse.Namespace) -> None:
    """Start (or join, with --address) a Ray cluster, run the app, wait for SIGTERM or
    Ctrl+C, drain every replica (drain_replicas), then delete the app and, if the command
    started it, the local Ray. A second signal skips the rest of the drain."""
    check_ray_args(args)
    bind(args.host, args.port).close()  # a taken port fails here, in a second
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=args.address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=args.log_level == "debug")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise CLIError(f"cannot reach the Ray cluster at {args.address or 'RAY_ADDRESS'}: "
                       f"{str(e).splitlines()[0]}") from None
    stop, skip = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: skip.set() if stop.is_set() else stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        drain_signal = DrainSignal.remote()
        serve.run(application(args, drain_signal), name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d through Ray Serve (%s cluster); Ctrl+C stops",
                    args.host, args.port, "local" if local else "joined")
        stop.wait()
        logger.info("draining every replica: new requests get 503, running ones get up to "
                    "%.0f s", args.shutdown_timeout)
        left = drain_replicas(drain_signal, args.shutdown_timeout, skip)
        if left:
            logger.warning("%d replica(s) did not report drained; deleting the app anyway",
                           left)
        serve.delete(APP_NAME)
    except RuntimeError as e:  # e.g. a replica's constructor failed (Ray retried it)
        raise CLIError(f"Ray Serve could not start the app: {str(e).splitlines()[0]}") from None
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()
