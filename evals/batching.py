"""Micro-batching for work that Inspect requests one sample at a time.

Inspect runs a task's samples as concurrent coroutines, and each asks for its own generation and its
own score. On a small model one forward pass per sample costs nearly as much as one pass for thirty
samples, so requests that arrive together are queued and run as one batch in a worker thread (which
also keeps the event loop free while the batch runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: How long the first request of a batch waits for others to join it.
JOIN_SECONDS = 0.01


@dataclass(eq=False)  # compared by identity: items may hold tensors, whose == is elementwise
class _Pending(Generic[Item]):
    item: Item
    key: Hashable
    future: asyncio.Future


class MicroBatcher(Generic[Item, Result]):
    """``await batcher.submit(item)`` → ``run(batch)[i]`` for the batch that ``item`` joined.

    ``run`` takes a list of items and returns one result per item, in order; it runs in a thread.
    Items whose ``key`` differs never share a batch (e.g. generations of different lengths); a key
    that raises fails that one ``submit``. An exception from ``run`` is raised to every request of
    that batch, and the next batch still runs. Queued items are compared by identity only (requests
    carry tensors).
    """

    def __init__(self, run: Callable[[list[Item]], list[Result]], max_batch: int = 32,
                 key: Callable[[Item], Hashable] | None = None):
        self.run = run
        self.max_batch = int(max_batch)
        self.key = key or (lambda _item: None)
        self._queue: list[_Pending[Item]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        # the key is computed here, so an item whose key fails fails alone, before it is queued
        loop = asyncio.get_running_loop()
        pending = _Pending(item, self.key(item), loop.create_future())
        # Inspect runs each eval in its own event loop; what an interrupted eval left queued, and its
        # worker, belong to a loop that is gone: drop them rather than wait on them.
        self._queue = [p for p in self._queue if p.future.get_loop() is loop]
        self._queue.append(pending)
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = asyncio.create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        await asyncio.sleep(JOIN_SECONDS)
        while self._queue:
            key = self._queue[0].key
            batch = [p for p in self._queue if p.key == key][: self.max_batch]
            chosen = {id(p) for p in batch}
            self._queue = [p for p in self._queue if id(p) not in chosen]
            try:
                results: list[Any] = await asyncio.to_thread(self.run, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, never a hang
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
