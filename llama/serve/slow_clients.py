"""Clients that stop reading: a reply that cannot be written for `seconds` is given up, and its connection dropped.

A streamed reply is written event by event as tokens come. When its client stops reading, the kernel's buffers and
then uvicorn's (64 KiB) fill up, and the next write waits until the client reads again: without a bound, for as
long as the client keeps its connection open, holding the request's KV slot all that time. Bounded, the write
fails, the reply's stream is closed (which cancels its sequences, freeing their slots) and the connection is
dropped. Replies that are not streamed are written whole in one go, into uvicorn's buffer, which never waits: a
client that does not read them holds only that buffer.
"""

import asyncio
import logging

log = logging.getLogger("llama.serve")


class ClientStalled(OSError):
    """The client read nothing of its reply for the allowed time."""


class WriteDeadline:
    """ASGI middleware, outermost (given to uvicorn): every write of a response must complete within `seconds`."""

    def __init__(self, app, seconds: float):
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
            raise ValueError(f"stream_timeout must be a number of seconds > 0, got {seconds!r}")
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_in_time(message) -> None:
            try:  # wait_for rather than asyncio.timeout, which Python 3.10 lacks
                await asyncio.wait_for(send(message), self.seconds)
            except asyncio.TimeoutError:
                client = "{}:{}".format(*scope["client"]) if scope.get("client") else "a client"
                log.warning("%s read nothing of its reply to %s for %g s: the reply is given up and the connection "
                            "closed", client, scope["path"], self.seconds)
                _drop(send)
                raise ClientStalled(f"the client read nothing for {self.seconds:g} s") from None

        try:
            await self.app(scope, receive, send_in_time)
        except ClientStalled:
            await asyncio.sleep(0)  # let the server see the connection lost, so it does not report the reply cut


def _drop(send) -> None:
    """Close the connection at once, unwritten bytes and all.

    A plain close waits until the buffered bytes are written, which is never for a client that does not read.
    ASGI has no call to drop a connection; uvicorn's `send` is a method of its request cycle, which holds the
    connection's transport. Under another server the connection is left to it, closed once the reply raised.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        transport.abort()
