"""The engine requests behind one HTTP request, as one unit: submit, first outputs, merge, abort.

One HTTP request fans out into prompts x n engine requests. `Fanout` submits them together,
awaits their first outputs together (so that refusals such as a full queue surface before
the HTTP status is sent), merges the rest into one stream of (choice index, output) and
aborts whatever has not finished when it is closed. It records each request's timings in
the server's metrics. It knows asyncio and the engine interface, nothing about HTTP;
server/api.py uses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from server.metrics import ServerMetrics
from server.openai_format import Submission
from server.outputs import RequestOutput

logger = logging.getLogger(__name__)


class Fanout:
    """The engine requests behind one HTTP request: submitted together, their first outputs
    awaited together (so refusals become HTTP statuses before any byte is sent), then merged
    into one stream of (choice index, output). `close()` is synchronous on purpose: it runs
    in `finally` blocks under cancellation, where an await would be cancelled again."""

    def __init__(self, engine, subs: list[Submission], metrics: ServerMetrics, arrival: float):
        self.engine, self.subs = engine, subs
        self.timers = [metrics.track(arrival, len(s.prompt_ids)) for s in subs]
        self.gens = [engine.generate(s.prompt_ids, s.params, request_id=s.request_id)
                     for s in subs]
        self.finished = [False] * len(subs)
        self.generated = [0] * len(subs)
        self.first: list[RequestOutput] = []
        self.tasks: list[asyncio.Task] = []

    def note(self, i: int, out: RequestOutput) -> None:
        self.generated[i] = out.num_generated_tokens
        self.timers[i].output(len(out.token_ids))
        if out.finished:
            self.finished[i] = True
            self.timers[i].finish(out.finish_reason, out.num_generated_tokens)

    async def start(self) -> None:
        try:
            if len(self.gens) == 1:
                self.first = [await anext(self.gens[0])]
            else:
                self.tasks = [asyncio.ensure_future(anext(g)) for g in self.gens]
                self.first = await asyncio.gather(*self.tasks)
        except Exception:  # refused (queue full, too long, ...): not an abort in the metrics
            for timer in self.timers:
                timer.discard()
            self.close()
            raise
        except BaseException:  # cancelled: the client went away while the request waited
            self.close()
            raise
        self.tasks = []
        for i, out in enumerate(self.first):
            self.note(i, out)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        for i, out in enumerate(self.first):
            yield i, out
        pending = [i for i, done in enumerate(self.finished) if not done]
        if len(self.gens) == 1:
            if pending:
                async for out in self.gens[0]:
                    self.note(0, out)
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in self.gens[i]:
                    queue.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))
        self.tasks = [asyncio.ensure_future(pump(i)) for i in pending]
        remaining = len(pending)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                self.note(i, item)
                yield i, item

    def close(self) -> None:
        """Abort whatever has not finished and free its KV blocks now."""
        for task in self.tasks:
            task.cancel()
        for i, sub in enumerate(self.subs):
            if not self.finished[i]:
                self.finished[i] = True
                self.timers[i].finish("abort", self.generated[i])
                try:
                    self.engine.abort(sub.request_id)
                except Exception:  # noqa: BLE001 - abort must never mask the real error
                    logger.exception("abort of %s failed", sub.request_id)
