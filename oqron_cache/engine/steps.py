"""Steps: the engine's I/O written once, as generators, and the two drivers that run them.

Every part of the engine that talks to Redis, runs a resolver or waits is a generator function
(a *step*) that yields an *effect* where it would do I/O, and gets the effect's result back
(or its exception thrown in). The sync front runs steps with :func:`drive`, the async front
with :func:`adrive`; neither front has a read or write path of its own (DESIGN section 10).

The effects, and what each driver does with them (``drive`` | ``adrive``):

``(L2, name, args)``
    ``stack.l2.<name>(*args)`` | ``await <the loop's L2 store>.<name>(*args)``
``(SCRIPT, name, keys, args)``
    ``conn.run(conn.<name>, keys=..., args=...)`` | ``await <the loop's conn>.script(...)``
``(EACH, name, calls)``
    the script ``name`` once per ``(keys, args)`` of ``calls``, pipelined (``run_each``)
``(CMD, name, args)``
    the client's own command ``name(*args)`` (``zscan``, ``exists``, ...), through the breaker
``(RUN, fn, key)``
    ``fn(key)``, and an awaitable result run to completion on this thread's loop |
    ``await fn(key)`` for an ``async def``, else ``fn`` in a worker thread (the loop never
    blocks)
``(EVENT,)``
    a new ``threading.Event`` | a new :class:`LoopEvent` of the running loop
``(WAIT, event, timeout)``
    ``event.wait(timeout)`` | ``await event.wait_for(timeout)``
``(JOIN, flight)``
    ``flight.wait()`` | ``await`` the flight (woken thread-safely, never polled)
``(SLEEP, seconds)``
    ``time.sleep`` | ``await asyncio.sleep``

Redis errors reach a step as :class:`~oqron_cache.redis.store.L2Unavailable` from either
driver (the same breaker counts them). A cancelled task's ``CancelledError`` is thrown into the
step it was in, so a step's ``except BaseException`` / ``finally`` can still yield effects to
release what it holds (its lock) before the error goes on.

Adding a step: write it as a generator beside the code it belongs to, yield an effect for each
I/O, call other steps with ``yield from``, and give the fronts a call of ``drive`` / ``adrive``
on it. A new kind of effect needs one branch in each driver and a scenario in
``tests/test_fronts.py`` (which runs one table of scenarios through both fronts and compares
every outcome and counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .flight import Flight

T = TypeVar("T")

# Effect tags (the first element of an effect tuple).
L2 = 1
SCRIPT = 2
RUN = 3
EVENT = 4
WAIT = 5
JOIN = 6
SLEEP = 7
EACH = 8
CMD = 9

Effect = tuple[Any, ...]
Step = Generator[Effect, Any, T]


class LoopEvent:
    """A ``threading.Event`` look-alike for an asyncio waiter: ``set()`` may be called from
    any thread (the bus listener's) and wakes the waiting task through
    ``call_soon_threadsafe``; nothing polls."""

    __slots__ = ("_event", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._event.set)

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait_for(self, timeout: float) -> None:
        # asyncio.TimeoutError: on Python 3.10 it is not the builtin TimeoutError (3.11+ alias).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


# -- the sync driver ----------------------------------------------------------------------


def drive(step: Step[T], l2: Any) -> T:
    """Run ``step`` to its end on this thread; ``l2`` is the sync L2 store (or ``None``)."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = step.send(send) if error is None else step.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = send = None
        try:
            kind = effect[0]
            if kind == L2:
                send = getattr(l2, effect[1])(*effect[2])
            elif kind == SCRIPT:
                conn = l2.conn
                send = conn.run(getattr(conn, effect[1]), keys=effect[2], args=effect[3])
            elif kind == RUN:
                send = call_sync(effect[1], effect[2])
            elif kind == EVENT:
                send = threading.Event()
            elif kind == WAIT:
                effect[1].wait(effect[2])
            elif kind == JOIN:
                send = effect[1].wait()
            elif kind == SLEEP:
                time.sleep(effect[1])
            elif kind == EACH:
                conn = l2.conn
                send = conn.run(conn.run_each, getattr(conn, effect[1]), effect[2])
            elif kind == CMD:
                conn = l2.conn
                send = conn.run(getattr(conn.client, effect[1]), *effect[2])
            else:  # pragma: no cover - a step yielded something that is not an effect
                raise TypeError(f"not an effect: {effect!r}")
        except BaseException as exc:  # thrown into the step, which decides
            error = exc


class _OwnLoop:
    """A thread's own event loop, closed (its async generators finalised first, which closes
    the library's pools on it) when the thread ends and its locals go."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        loop = self.loop
        if loop.is_closed() or loop.is_running():
            return
        with contextlib.suppress(Exception):  # the thread is ending: best effort
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


_local = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's own event loop, for async resolvers called from sync code (a worker)."""
    own: _OwnLoop | None = getattr(_local, "own", None)
    if own is None or own.loop.is_closed():
        own = _local.own = _OwnLoop()
    return own.loop


def call_sync(resolver: Callable[[str], Any], key: str) -> Any:
    """Call ``resolver(key)``; an async resolver runs to completion on this thread's loop."""
    value = resolver(key)
    if inspect.isawaitable(value):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _thread_loop().run_until_complete(_awaited(value))
        if inspect.iscoroutine(value):
            value.close()  # never awaited: do not leave a "never awaited" warning behind
        raise RuntimeError(
            "an async resolver was called from sync code running inside an event loop: use "
            "the async front (await cache.aget(...)) there, or a sync resolver"
        )
    return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


# -- the async driver ---------------------------------------------------------------------


async def adrive(step: Step[T], l2: Any) -> T:
    """Run ``step`` to its end on the running loop; ``l2`` is the loop's async L2 store."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = step.send(send) if error is None else step.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = send = None
        try:
            kind = effect[0]
            if kind == L2:
                send = await getattr(l2, effect[1])(*effect[2])
            elif kind == SCRIPT:
                send = await l2.conn.script(effect[1], effect[2], effect[3])
            elif kind == RUN:
                send = await call_async(effect[1], effect[2])
            elif kind == EVENT:
                send = LoopEvent(asyncio.get_running_loop())
            elif kind == WAIT:
                await effect[1].wait_for(effect[2])
            elif kind == JOIN:
                send = await join_async(effect[1])
            elif kind == SLEEP:
                await asyncio.sleep(effect[1])
            elif kind == EACH:
                send = await l2.conn.run_each(effect[1], effect[2])
            elif kind == CMD:
                conn = l2.conn
                send = await conn.run(getattr(conn.client, effect[1]), *effect[2])
            else:  # pragma: no cover
                raise TypeError(f"not an effect: {effect!r}")
        except BaseException as exc:  # thrown into the step, which decides
            error = exc


async def call_async(resolver: Callable[[str], Any], key: str) -> Any:
    """Call ``resolver(key)`` without blocking the loop: an ``async def`` is awaited here, a
    plain function runs in a worker thread (and what it returns is awaited if awaitable)."""
    if inspect.iscoroutinefunction(resolver) or inspect.iscoroutinefunction(
        getattr(resolver, "__call__", None)  # noqa: B004 - an object with an async __call__
    ):
        return await resolver(key)
    value = await asyncio.to_thread(resolver, key)
    if inspect.isawaitable(value):
        value = await value
    return value


async def join_async(flight: Flight) -> Any:
    """Wait, on the running loop, for another thread's or task's load of the key."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    if flight.add_future(loop, woken):
        await woken  # a cancelled waiter leaves a done future behind: skipped when woken
    return flight.result()
