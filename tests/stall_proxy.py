"""A TCP proxy that holds new connections until told to let them through (a hung broker).

``StallProxy(("127.0.0.1", 5672))`` listens on a free port. Connections it accepts get no byte
until :meth:`release` (then they are joined to the upstream and pumped both ways) or
:meth:`cut` (then they are closed). Imports nothing from the library.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["StallProxy"]


class StallProxy:
    """Accept, hold, then forward or cut."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._released = threading.Event()
        self._cut = threading.Event()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, name="stall-proxy", daemon=True).start()

    def release(self) -> None:
        """Let held and later connections through."""
        self._released.set()

    def cut(self) -> None:
        """Close held and later connections."""
        self._cut.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        while not (self._released.wait(0.01) or self._cut.is_set() or self._closed):
            pass
        if self._cut.is_set() or self._closed:
            with contextlib.suppress(OSError):
                client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._socks.append(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> StallProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
