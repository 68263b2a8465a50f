"""Connection limits uvicorn lacks: a deadline for each request's headers and body, and a cap
on open connections that a flood of never-finished requests cannot use to lock clients out.

uvicorn times out only idle keep-alive connections (`timeout_keep_alive`, armed after a
response). A connection that never sends a byte, or sends half its headers, or a body it
never finishes, stays open for ever: each one holds a file descriptor, and at a common
limit of 1,024 a few hundred slow clients lock every new client out. `limits_protocol()`
returns uvicorn's httptools protocol with three additions:

- headers must be complete `timeout_headers` seconds after a connection opens or a new
  request starts (else 408 and close);
- the body must be complete `timeout_body` seconds after the headers (else the connection
  closes; the app sees a disconnect, which aborts its work as any client disconnect does);
- at `max_connections` open connections, a new one evicts the oldest connection that is
  idle or still waiting for its request's headers (never one whose request is being
  served); when every connection is busy with a request, the new one gets 503 and closes.

Generation itself has no deadline here (a long stream is not slow input). server/cli.py
passes the class to uvicorn as `http=`.
"""

from __future__ import annotations

import json
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _response(status: str, message: str, code: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with an OpenAI error body."""
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"{extra}content-length: {len(body)}\r\n\r\n").encode() + body


TIMEOUT_RESPONSE = _response("408 Request Timeout", "the request was not received in time",
                             "request_timeout")
BUSY_RESPONSE = _response("503 Service Unavailable", "too many open connections",
                          "too_many_connections", "retry-after: 1\r\n")


def limits_protocol(timeout_headers: float, timeout_body: float, max_connections: int):
    """uvicorn's HttpToolsProtocol with these limits (a class, for `uvicorn.Config(http=)`)."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._deadline = None  # the running header or body timer
            self._waiting_since: float | None = None  # set while waiting for headers
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._evict_one():
                self.connections.discard(self)
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._await_headers()

        def _evict_one(self) -> bool:
            """Close the longest-waiting connection that has sent no complete headers."""
            idle = [c for c in self.connections if c is not self
                    and getattr(c, "_waiting_since", None) is not None]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._waiting_since)
            oldest._give_up(TIMEOUT_RESPONSE)
            return True

        def _arm(self, seconds: float, response: bytes | None) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._give_up, response)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _await_headers(self) -> None:
            self._waiting_since = time.monotonic()
            self._arm(timeout_headers, TIMEOUT_RESPONSE)

        def _give_up(self, response: bytes | None) -> None:
            self._disarm()
            self._waiting_since = None
            self.connections.discard(self)  # no longer counts, even before the close lands
            if not self.transport.is_closing():
                if response is not None:
                    self.transport.write(response)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:  # a new request on a kept-alive connection
                self._await_headers()

        def on_headers_complete(self) -> None:
            self._waiting_since = None
            self._arm(timeout_body, None)  # the app has started: no raw bytes after this
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # idle until the next request: evictable
                self._waiting_since = time.monotonic()

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._waiting_since = None
            super().connection_lost(exc)

    return LimitedHttpToolsProtocol
