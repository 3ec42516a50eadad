"""What the demo prints while it runs: progress lines from several threads, library warnings.

:class:`Printer` writes whole lines to the demo's output, whichever thread they come from (the
worker's refresh lines arrive live). :func:`quiet_logging` shows the library's warnings on
stderr as single lines, each once, for the length of a run (in the demo and in its helpers).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import IO


class Printer:
    """Lines to the demo's output from several threads (worker lines arrive live)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock, contextlib.suppress(ValueError):  # ValueError: the stream was closed
            print(text, file=self.out, flush=True)


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once, without its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[object] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # The message template and its first argument: "L2 %s: ..." once per kind of failure.
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        ident = (record.msg, str(first))
        if ident in self.seen:
            return False
        self.seen.add(ident)
        record.exc_info = None
        record.exc_text = None
        return True


@contextlib.contextmanager
def quiet_logging(stream: IO[str]) -> Iterator[None]:
    """Show the library's warnings as single lines, each once, for the length of the demo."""
    logger = logging.getLogger("oqron_cache")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.addFilter(_OncePerMessage())
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved
