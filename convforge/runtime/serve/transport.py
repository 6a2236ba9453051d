"""How bytes become HTTP requests: uvicorn's h11 protocol, with a deadline for the headers.

h11 caps a request's head (request line and headers) at 16 KiB and answers 400
past it; uvicorn's httptools protocol has no such cap and re-copies a long
header on every packet (seconds of event-loop CPU for a 200 MB header). Neither
bounds how long a client may take to send its head: a slow sender (slowloris)
would hold its connection forever. :class:`DeadlinedH11` closes a connection
whose head has not arrived ``timeout_s`` after it opened, or after its previous
response (a keep-alive connection). The body's deadline is the ASGI guard's
(:mod:`.http_app`), which reads every body before the application sees it.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_LIMIT = 16 * 1024  # bytes of request line + headers (h11's default, said here)


def deadlined_h11(timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with a ``timeout_s`` head deadline."""
    return type("DeadlinedH11", (DeadlinedH11,), {"head_timeout_s": timeout_s})


class DeadlinedH11(H11Protocol):
    head_timeout_s = 30.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # the next request's head has its own deadline (armed first: the
        super().on_response_complete()  # call below may parse a pipelined head at once)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
