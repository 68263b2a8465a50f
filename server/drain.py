"""Graceful shutdown in two phases: drain, then stop.

uvicorn's own SIGTERM handling closes the listening socket at once, so a client that
arrives during the drain gets "connection refused" and cannot tell a restart from a crash.
Here the first SIGTERM (or Ctrl+C) only starts a drain: the socket stays open, new requests
get a 503 `server_shutting_down` with `Retry-After` and `Connection: close` (a load balancer
retries them elsewhere), `/health` turns 503 so it stops routing here, and the requests
already admitted run to the end. When none is left, or `--shutdown_timeout` has passed (the
engine then aborts what still runs, so each stream ends with an error event and [DONE]),
uvicorn's shutdown proper runs. A second signal skips the rest of the drain; a third exits
without waiting for anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi.responses import JSONResponse

from server.protocol import error_body

logger = logging.getLogger(__name__)

#: Still answered normally while draining: scrapers and version probes are not load.
PASS_THROUGH = frozenset({"/metrics", "/version"})
#: After the deadline's abort, how long finishing streams get before uvicorn stops anyway.
AFTER_ABORT_S = 3.0


class Drain:
    """Counts the HTTP requests in flight and knows whether (and since when) we drain."""

    def __init__(self, timeout_s: float, on_deadline: Callable[[], Awaitable[None]] | None = None,
                 retry_after_s: int = 1):
        self.timeout_s = timeout_s
        self.on_deadline = on_deadline  # the app sets it to the engine's shutdown (aborts all)
        self.retry_after_s = retry_after_s
        self.started_at: float | None = None
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
            logger.info("draining: %d request(s) in flight get up to %.0f s; new ones get 503",
                        self.in_flight, self.timeout_s)

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    async def run(self, poll_s: float = 0.1) -> None:
        """The drain itself, for one process or one Ray replica alike: start it (new requests
        get 503 from now), wait for the requests in flight up to `timeout_s`, then abort what
        still runs (`on_deadline`: each stream ends with an error event and [DONE]) and give
        those AFTER_ABORT_S to send it."""
        self.begin()
        while self.in_flight and self.elapsed() < self.timeout_s:
            await asyncio.sleep(poll_s)
        if not self.in_flight:
            logger.info("drained in %.1f s", self.elapsed())
            return
        logger.warning("%d request(s) still running after %.0f s: aborting them",
                       self.in_flight, self.timeout_s)
        if self.on_deadline is not None:
            await self.on_deadline()
        aborted_at = time.monotonic()
        while self.in_flight and time.monotonic() - aborted_at < AFTER_ABORT_S:
            await asyncio.sleep(poll_s)

    def refusal(self) -> JSONResponse:
        return JSONResponse(
            error_body("the server is shutting down; retry the request later or elsewhere",
                       "server_error", code="server_shutting_down"),
            status_code=503,
            headers={"Retry-After": str(self.retry_after_s), "Connection": "close"})


class DrainGate:
    """Pure ASGI middleware: counts the requests in flight; while draining, answers new ones
    with 503 (except PASS_THROUGH). `/health` is refused too, which is what a readiness
    probe needs to see."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PASS_THROUGH:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            return await self.drain.refusal()(scope, receive, send)
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose signal handler starts a Drain instead of stopping at once.

    Not re-raising the signal after serving (uvicorn does) is deliberate: a drained server
    exits with status 0, which is what process supervisors expect after a SIGTERM."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._drain_task: asyncio.Task | None = None  # Drain.run, once the drain starts

    def handle_exit(self, sig, frame) -> None:
        if not self.drain.draining:
            self.drain.begin()
        elif not self.should_exit:
            logger.warning("second signal: stopping without waiting for the drain")
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self._drain_task is None:  # the first tick after the signal
                self._drain_task = asyncio.create_task(self.drain.run())
            elif self._drain_task.done():
                self.should_exit = True
        return await super().on_tick(counter)
