"""Dynamic micro-batching: concurrent map requests to one atlas share one encode and one search.

The first request to arrive for an atlas opens a batch; requests arriving within
`wait_s` (or until `max_cells` cells are waiting) join it; the batch is mapped in
one call and each request is answered with its own part. A batch of up to
`inline_cells` cells is mapped on the event loop itself (measured: handing a
small batch to a thread cost more than mapping it, 486 against 708 requests/s
for 1-cell requests with 32 clients); bigger batches run on a thread of their
own while the event loop reads the next requests. Under load, batches grow by
themselves (everything that arrived while the previous batch ran); alone, a
request waits at most `wait_s`. `wait_s = 0` turns batching off: each request is
mapped by itself on the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cellvec.service.threads import cores

log = logging.getLogger(__name__)


class Batcher:
    def __init__(
        self,
        run: Callable,
        *,
        wait_s: float = 0.002,
        max_cells: int = 4096,
        inline_cells: int = 256,
        thread_setup: Callable | None = None,
    ):
        """`run(key_object, jobs)` maps a batch and returns one result (or exception) per job;
        `thread_setup()` runs first in each thread that maps batches (e.g. `threads.limit_thread`,
        as OpenMP's thread count is set per thread)."""
        self.run = run
        self.wait_s = wait_s
        self.max_cells = max_cells
        self.inline_cells = inline_cells
        self.queues: dict = {}
        self.executor = ThreadPoolExecutor(
            1, thread_name_prefix="cellvec-batch", initializer=thread_setup
        )
        # without batching each request is mapped by itself, one per core at a time (more
        # threads, each with its own pools, would spin against each other: issue 25)
        self.unbatched = (
            ThreadPoolExecutor(cores(), thread_name_prefix="cellvec-map", initializer=thread_setup)
            if wait_s <= 0
            else None
        )
        self.batches = 0  # counters, for tests and logs
        self.jobs = 0

    async def submit(self, key, target, job, n_cells: int):
        """Map `job` against `target` (e.g. an atlas version; `key` names it) and return its result."""
        loop = asyncio.get_running_loop()
        if self.wait_s <= 0:
            self.batches += 1
            self.jobs += 1
            result = (await loop.run_in_executor(self.unbatched, self.run, target, [job]))[0]
            if isinstance(result, Exception):
                raise result
            return result
        fut = loop.create_future()
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = []
            queue.append((job, n_cells, fut, loop.time()))
            loop.create_task(self._drain(key, target))
        else:
            queue.append((job, n_cells, fut, loop.time()))
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    async def _drain(self, key, target):
        loop = asyncio.get_running_loop()
        queue = self.queues[key]
        try:
            while queue:
                # let concurrent requests join, for at most wait_s after the oldest arrived
                # (under load the queue has waited while the previous batch ran: no wait)
                delay = queue[0][3] + self.wait_s - loop.time()
                if delay > 0 and sum(item[1] for item in queue) < self.max_cells:
                    await asyncio.sleep(delay)
                batch, cells = [], 0
                while queue and (not batch or cells + queue[0][1] <= self.max_cells):
                    item = queue.pop(0)
                    batch.append(item)
                    cells += item[1]
                self.batches += 1
                self.jobs += len(batch)
                try:
                    jobs = [item[0] for item in batch]
                    if cells <= self.inline_cells:  # a thread hop costs more than the work
                        results = self.run(target, jobs)
                    else:
                        results = await loop.run_in_executor(self.executor, self.run, target, jobs)
                except Exception as e:  # noqa: BLE001 (each waiting request gets the error)
                    results = [e] * len(batch)
                for item, res in zip(batch, results):
                    if not item[2].done():
                        item[2].set_result(res)
        finally:
            del self.queues[key]
            for item in queue:  # only if cancelled: fail what is left
                if not item[2].done():
                    item[2].set_exception(RuntimeError("batch cancelled"))
