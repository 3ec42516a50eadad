"""Shared fixtures.

Infrastructure fixtures (no library import) come first; library fixtures go in the
section at the bottom.  Anything that needs Redis FAILS (never skips) when Redis is
missing: start it with ``.ci/run`` or point ``OQRON_TEST_REDIS_URL`` at one.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest
import redis

from oqron_cache.testing import FakeClock as FakeClock  # noqa: PLC0414 - re-exported for tests
from tests.redis_server import RedisServer, delete_namespace

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

T = TypeVar("T")


# -- infrastructure (independent of oqron_cache) ------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # A non-interactive shell starts a background job (`./dev test &`) with SIGINT ignored, and
    # every process the tests start would inherit that: the Ctrl-C tests (demo, stats --watch)
    # could not interrupt anything. Deliver it again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the shared Redis; must answer PING or every test using it fails."""
    url = os.environ.get("OQRON_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        error = None
    except redis.RedisError as exc:
        error = exc
    finally:
        client.close()
    if error is not None:
        pytest.fail(
            f"Redis is required for this test but {url} does not answer PING ({error!r}). "
            "Start redis-server (see .ci/run) or set OQRON_TEST_REDIS_URL.",
            pytrace=False,
        )
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the shared Redis.  Never FLUSHALL/FLUSHDB it: use ``namespace``."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh namespace (``t-<8 hex>``); its keys ``oqron:<ns>:*`` are deleted afterwards."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    yield ns
    delete_namespace(redis_client, ns)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private redis-server on a free port, for tests that kill/pause/fill/demote it."""
    with RedisServer() as server:
        yield server


# -- library fixtures ---------------------------------------------------------------------


@pytest.fixture
def configured(redis_url: str, namespace: str) -> Iterator[str]:
    """``oqron_cache.configure()`` on the shared Redis in a fresh namespace; reset afterwards.

    Yields the namespace.
    """
    import oqron_cache
    from oqron_cache.config import reset

    oqron_cache.configure(redis_url=redis_url, namespace=namespace)
    try:
        yield namespace
    finally:
        reset()


@pytest.fixture
def make_cache() -> Iterator[Callable[..., Any]]:
    """``make_cache(**kwargs)``: ``oqron_cache.cache(name=<unique>, **kwargs)``, closed after."""
    import oqron_cache

    made: list[Any] = []

    def factory(**kwargs: Any) -> Any:
        kwargs.setdefault("name", f"c-{uuid.uuid4().hex[:8]}")
        created = oqron_cache.cache(**kwargs)
        made.append(created)
        return created

    try:
        yield factory
    finally:
        for created in made:
            created.close()


class Closing(Protocol):
    """Type of the ``closing`` fixtures: registers ``obj`` for closing and returns it unchanged.

    Typed (rather than ``Any``) so that ``@closing`` keeps the decorated function's type.
    """

    def __call__(self, obj: T, /) -> T: ...


@pytest.fixture
def clock() -> FakeClock:
    """An injectable clock: pass ``clock=clock`` to ``cache(...)``; move it with ``tick``."""
    return FakeClock()
