"""Model calls off the event loop, one at a time.

The model is not thread-safe and one call already uses every core, so calls queue behind one
lock; each runs in a worker thread, leaving the event loop free to answer ``/health`` and to
notice clients that went away. Requests that can share a model call (greedy drawings with the
same settings) wait for the lock together and are served by one batched call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator, Hashable, Sequence
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
_DONE = object()


class ModelWorker:
    """Runs blocking model calls and generators in a thread, behind one lock."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.waiting = 0  # requests queued for the model, the running one included
        self._queues: dict[Hashable, list[tuple[list, asyncio.Future]]] = {}

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

    async def run_batched(
        self, key: Hashable, items: Sequence, fn: Callable[[Hashable, list], list], max_items: int
    ) -> tuple[list, int]:
        """``fn(key, items)``'s results for ``items``, computed in one call together with the
        items of every other request of the same ``key`` that is waiting when the model frees
        (at most ``max_items`` a call; ``fn`` returns one result per item, in order).

        Returns (this request's results, how many requests the call served). A request whose
        client went away before its call began is left out of it."""
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(key, [])
        queue.append((list(items), fut))
        if len(queue) == 1:  # the first of a new group: one task serves the whole group
            asyncio.ensure_future(self._drain(key, fn, max_items))
        self.waiting += 1
        try:
            return await fut
        finally:
            self.waiting -= 1

    async def _drain(self, key: Hashable, fn: Callable[[Hashable, list], list], max_items: int) -> None:
        async with self._lock:
            queue = [(items, fut) for items, fut in self._queues.pop(key, []) if not fut.done()]
            taken, rows = [], 0
            while queue and (not taken or rows + len(queue[0][0]) <= max_items):
                taken.append(queue.pop(0))
                rows += len(taken[-1][0])
            if queue:  # more than one call holds: the rest go first in the next group
                self._queues.setdefault(key, [])[:0] = queue
                asyncio.ensure_future(self._drain(key, fn, max_items))
            if not taken:
                return
            try:
                results = await run_in_threadpool(fn, key, [x for items, _ in taken for x in items])
            except Exception as e:  # every request of the call gets the error
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(e)
                return
        start = 0
        for items, fut in taken:
            if not fut.done():
                fut.set_result((results[start : start + len(items)], len(taken)))
            start += len(items)

    async def stream(
        self, gen: Generator[T, None, Any], on_return: Callable[[Any], None] | None = None
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
