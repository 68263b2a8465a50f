"""The async front of the engine: `generate(prompt_ids, params) -> async iterator`, `abort`.

One background task owns the `LLMEngine`: it applies the requests and aborts submitted
since the last step, runs `engine.step()` in a worker thread (off the event loop), and
delivers each `RequestOutput` to its request's queue. Submissions are checked on the event
loop (invalid params, too long, queue full) so `generate` raises on its first iteration.
A consumer that stops iterating early aborts its request, freeing its KV blocks before
the next step. If a step raises, the engine is dead: every pending request finishes with
"error" and later calls raise `EngineDeadError`. This module knows asyncio and the engine
interface only; server/api.py and server/cli.py call it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from server.outputs import EngineDeadError, EngineStats, QueueFullError, RequestOutput

if TYPE_CHECKING:
    from server.engine import LLMEngine
    from server.sampling import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_config = engine.config
        self.is_running = False
        self.is_dead = False
        self._lock = threading.Lock()  # guards _ops, read by the worker thread
        self._ops: list[tuple[str, str, list[int] | None, SamplingParams | None]] = []
        self._pending_adds = 0
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    async def start(self) -> None:
        if self.is_running:
            return
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._stopping = False
        self.is_running = True
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def shutdown(self) -> None:
        if not self.is_running:
            return
        self._stopping = True
        self._wake.set()
        try:
            await self._task
        finally:
            self.is_running = False
            self._executor.shutdown(wait=True)
            for request_id in list(self._queues):
                self._deliver_final(request_id, "abort",
                                    "the server shut down before the request finished")

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- requests ----
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError("the engine has stopped")
        if not self.is_running:
            raise EngineDeadError("the engine is not running (call start() first)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_ids, params)
        stats = self.engine.stats()
        if stats.num_waiting + self._pending_adds >= self.engine_config.max_queue_len:
            raise QueueFullError(f"{stats.num_waiting + self._pending_adds} requests are "
                                 "already waiting; retry later")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        with self._lock:
            self._ops.append(("add", request_id, list(prompt_ids), params))
            self._pending_adds += 1
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, Exception):  # refused when the worker added it
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (aclose, disconnect, cancellation)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request: its KV blocks are freed before the next step."""
        if request_id not in self._queues:
            return
        with self._lock:
            self._ops.append(("abort", request_id, None, None))
        self._deliver_final(request_id, "abort", None)
        if self._wake is not None:
            self._wake.set()

    # ---- the loop ----
    def _apply_ops_and_step(self) -> tuple[list[RequestOutput], list]:
        """Runs in the worker thread: submissions and aborts first, then one step."""
        with self._lock:
            ops, self._ops = self._ops, []
            self._pending_adds = 0
        errors = []
        for op, request_id, prompt_ids, params in ops:
            if op == "add":
                try:
                    self.engine.add_request(request_id, prompt_ids, params)
                except Exception as e:  # noqa: BLE001 - e.g. the queue filled meanwhile
                    errors.append((request_id, e))
            else:
                self.engine.abort(request_id)
        outputs = self.engine.step()
        return outputs, errors

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                with self._lock:
                    idle = not self._ops
                if idle and not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                outputs, errors = await loop.run_in_executor(self._executor,
                                                             self._apply_ops_and_step)
                for request_id, error in errors:
                    # e.g. the queue filled between generate()'s check and this add: the
                    # caller gets the same exception it would have got from that check
                    queue = self._queues.pop(request_id, None)
                    if queue is not None:
                        queue.put_nowait(error)
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                        if out.finished:
                            del self._queues[out.request_id]
                await asyncio.sleep(0)  # let consumers and new submissions run
        except Exception as e:  # noqa: BLE001 - the batched forward failed: the engine is dead
            logger.exception("the engine loop died")
            self.is_dead = True
            for request_id in list(self._queues):
                self._deliver_final(request_id, "error", f"the engine stopped: {e}")
        finally:
            if self._stopping:  # nothing runs any more: free every block
                with self._lock:
                    self._ops, self._pending_adds = [], 0
                for request_id in list(self.engine.scheduler.by_id):
                    self.engine.abort(request_id)

    def _deliver_final(self, request_id: str, reason: str, error: str | None) -> None:
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, "", [], None, [], None, 0, True, reason,
                                           error))
