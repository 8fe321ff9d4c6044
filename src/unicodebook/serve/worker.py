"""Model calls off the event loop, one at a time.

The model is not thread-safe and one call already uses every core, so calls queue behind one
lock; each runs in a worker thread, leaving the event loop free to answer ``/health`` and to
notice clients that went away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
_DONE = object()


class ModelWorker:
    """Runs blocking model calls and generators in a thread, behind one lock."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.waiting = 0  # requests queued for the model, the running one included

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread once the model is free."""
        self.waiting += 1
        try:
            async with self._lock:
                return await run_in_threadpool(fn, *args)
        finally:
            self.waiting -= 1

    async def stream(self, gen: Generator[T, None, Any], on_return: Callable[[Any], None] | None = None
                     ) -> AsyncIterator[T]:
        """The items of ``gen``, each produced in a worker thread, the lock held throughout.

        If the consumer stops (a client disconnected: the task is cancelled between two items),
        the generator is closed and the lock released, so the next request gets the model."""
        self.waiting += 1
        try:
            async with self._lock:
                try:
                    while True:
                        item = await run_in_threadpool(_next, gen, on_return)
                        if item is _DONE:
                            return
                        yield item
                finally:
                    gen.close()  # stops the decoding where it is
        finally:
            self.waiting -= 1


def _next(gen: Generator, on_return: Callable[[Any], None] | None):
    try:
        return next(gen)
    except StopIteration as stop:
        if on_return is not None:
            on_return(stop.value)
        return _DONE
