"""A small TCP proxy with faults, for the chaos soak: latency, stalls and resets per connection.

``Proxy(upstream_port).start()`` listens on 127.0.0.1:<free port> (``proxy.url`` for Redis
clients) and forwards every connection to the upstream, on an asyncio loop in a thread of its
own. Faults apply to the connections open now (all of them, or a seeded fraction) and, when
they apply to all, to the connections opened while they last:

* :meth:`Proxy.slow`: every chunk waits ``latency`` seconds before it is forwarded (each way);
* :meth:`Proxy.stall`: nothing is forwarded (the sockets stay open: a partition that TCP does not
  notice, like a paused server, but on the network);
* :meth:`Proxy.drop`: connections are reset (RST both ways), as a failing middlebox would;
* :meth:`Proxy.heal`: back to normal.

If the upstream refuses a connection (Redis down), the client's connection is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Proxy"]

HOST = "127.0.0.1"
CHUNK = 1 << 16
CONNECT_TIMEOUT = 1.0
T = TypeVar("T")


class _Link:
    """One proxied connection: its two streams and its faults."""

    def __init__(self, latency: float, stalled: bool) -> None:
        self.latency = latency
        self.flowing = asyncio.Event()
        if not stalled:
            self.flowing.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        self.flowing.set()  # a stalled pump wakes up, sees ``closed`` and ends
        for writer in self.writers:
            transport: Any = writer.transport
            with contextlib.suppress(Exception):  # already closed
                transport.abort()


class Proxy:
    """127.0.0.1:<port> -> ``upstream_host``:``upstream_port``, with injectable faults."""

    def __init__(self, upstream_port: int, upstream_host: str = HOST, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.links: set[_Link] = set()
        self.accepted = 0
        self._latency = 0.0  # faults for connections opened while a fault applies to all
        self._stalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Proxy:
        """Start listening (in a daemon thread); returns self."""
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, HOST, self.port)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name="soak-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def close(self) -> None:
        """Reset every connection and stop listening."""
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self.links):
                link.abort()

        with contextlib.suppress(Exception):  # the loop may be gone already
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            loop.close()
        self._loop = None

    # -- faults -------------------------------------------------------------------------------

    def slow(self, latency: float, fraction: float = 1.0, rng: random.Random | None = None) -> int:
        """Delay every chunk by ``latency`` s on ``fraction`` of the connections; how many."""

        def apply(link: _Link) -> None:
            link.latency = latency

        return self._apply(apply, fraction, rng, latency=latency)

    def stall(self, fraction: float = 1.0, rng: random.Random | None = None) -> int:
        """Stop forwarding on ``fraction`` of the connections; return how many."""
        return self._apply(lambda link: link.flowing.clear(), fraction, rng, stalled=True)

    def drop(self, fraction: float = 1.0, rng: random.Random | None = None) -> int:
        """Reset ``fraction`` of the connections (RST); return how many."""
        return self._apply(lambda link: link.abort(), fraction, rng)

    def heal(self) -> None:
        """No latency, no stall, on every connection and the new ones."""

        def apply(link: _Link) -> None:
            link.latency = 0.0
            link.flowing.set()

        self._apply(apply, 1.0, None, latency=0.0, stalled=False)

    def _apply(
        self,
        action: Callable[[_Link], None],
        fraction: float,
        rng: random.Random | None,
        **defaults: Any,
    ) -> int:
        def run() -> int:
            links = sorted(self.links, key=id)
            chosen = links
            if fraction < 1.0:
                chooser = rng or random.Random()
                chosen = [link for link in links if chooser.random() < fraction]
            else:
                self._latency = defaults.get("latency", self._latency)
                self._stalled = defaults.get("stalled", self._stalled)
            for link in chosen:
                action(link)
            return len(chosen)

        return self._call(run)

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(5)

    # -- forwarding ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(self._latency, self._stalled)
        link.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            link.abort()
            return
        link.writers.append(up_writer)
        self.links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        finally:
            self.links.discard(link)
            link.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.latency:
                    await asyncio.sleep(link.latency)
                await link.flowing.wait()
                if link.closed:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.abort()  # one side closed: close the other (a half-open Redis link is useless)
