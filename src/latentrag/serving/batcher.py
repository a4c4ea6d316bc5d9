"""Micro-batching: gather concurrent requests with the same settings into one batched call, off the event loop.

A request waits at most `max_wait_ms` for company and a batch holds at most `max_batch` requests; the oldest
waiting request always goes next (no starvation), and only requests with the same key (their settings)
share a batch. Batches run one at a time on a single worker thread, so the model is never used by two
threads at once and the event loop stays free to accept requests while a batch runs. A batch refused
for bad input (`LatentRagError`) is rerun one request at a time, so one bad request fails only itself.

The batcher knows what it holds: the requests waiting (`depth`), those running (`in_flight`) and their summed
cost (`pending_cost`), which the service's admission control reads; a request whose client left (or whose
deadline passed) is dropped before it runs, and `stop(timeout)` waits a bounded time for the running batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from latentrag.errors import LatentRagError


@dataclass(eq=False)
class Job:
    """One request. `events` (streaming only) receives (name, data) pairs pushed from the worker thread."""

    key: Hashable
    payload: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue | None = None
    abandoned: bool = False  # the client went away: its share of the batch may be dropped
    cost: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0

    @property
    def gone(self) -> bool:
        return self.abandoned or self.future.cancelled()

    def emit(self, name: str, data: dict) -> None:
        """From the worker thread: hand an event (name, data) to the request's stream on the event loop."""
        if self.events is not None and not self.gone:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (name, data))


class MicroBatcher:
    """`run(key, jobs)` executes one batch on the worker thread and returns one result per job (or raises)."""

    def __init__(self, run: Callable[[Hashable, list[Job]], list], max_batch: int = 8, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise LatentRagError(f"max batch must be at least 1 and max wait at least 0 ms, got {max_batch} and "
                                 f"{max_wait_ms}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._current: asyncio.Future | None = None  # the batch running on the worker thread
        self.waiting: set[Job] = set()  # submitted, not yet started
        self.running: list[Job] = []
        self.batches = 0
        self.on_batch: Callable[[int, float], None] | None = None  # (cost, seconds) of every batch that finished

    @property
    def depth(self) -> int:
        """Requests waiting for the worker (their clients still there)."""
        return sum(not job.gone for job in self.waiting)

    @property
    def in_flight(self) -> int:
        return sum(not job.gone for job in self.running)

    @property
    def pending_cost(self) -> int:
        """The summed cost of the requests waiting and running (a request whose client left counts no more)."""
        return sum(job.cost for job in (*self.waiting, *self.running) if not job.gone)

    @property
    def busy(self) -> bool:
        """A batch is running on the worker thread."""
        return self._current is not None and not self._current.done()

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentrag-batch")
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="latentrag-batcher")

    async def stop(self, timeout: float | None = None) -> bool:
        """Stop taking batches and wait at most `timeout` s (None: without bound) for the running one; whether
        the worker is idle. Waiting requests are the caller's to fail first (`RagService.stop` does)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._current is not None and not self._current.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._current), timeout)
        idle = not self.busy
        if self._executor is not None:
            self._executor.shutdown(wait=idle, cancel_futures=True)
            self._executor = None
        return idle

    def submit(self, key: Hashable, payload: Any, stream: bool = False, cost: int = 0) -> Job:
        """Queue a request; await `job.future` for its result (and read `job.events` when streaming)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running (start() it inside the event loop)")
        loop = asyncio.get_running_loop()
        job = Job(key, payload, loop.create_future(), loop, asyncio.Queue() if stream else None, cost=cost)
        self.waiting.add(job)
        self._queue.put_nowait(job)
        return job

    async def _loop(self) -> None:
        pending: list[Job] = []
        queue = self._queue
        while True:
            if not pending:
                pending.append(await queue.get())
            pending = self._drop_gone(pending)
            if not pending:
                continue
            head = pending[0]
            deadline = head.enqueued + self.max_wait
            while sum(job.key == head.key for job in pending) < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    while not queue.empty():  # whatever already arrived may still join
                        pending.append(queue.get_nowait())
                    break
                try:
                    pending.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    continue
            pending = self._drop_gone(pending)
            batch = [job for job in pending if job.key == head.key][: self.max_batch]
            pending = [job for job in pending if job not in batch]
            if batch:
                await self._execute(batch)

    def _drop_gone(self, jobs: list[Job]) -> list[Job]:
        kept = []
        for job in jobs:
            if job.gone:
                self.waiting.discard(job)  # never runs
            else:
                kept.append(job)
        return kept

    async def _execute(self, batch: list[Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            job.started = now
            self.waiting.discard(job)
        self.running = batch
        self.batches += 1
        try:
            self._current = asyncio.get_running_loop().run_in_executor(self._executor, self.run, batch[0].key, batch)
            results = await self._current
        except LatentRagError as e:
            if len(batch) > 1:  # one request's bad input must not fail the others: each runs alone
                for job in batch:
                    if not job.gone:
                        await self._execute([job])
                return
            self._fail(batch, e)
            return
        except Exception as e:  # the batch failed (or was stopped): every request in it gets the error
            self._fail(batch, e)
            return
        finally:
            self.running = []
        if self.on_batch is not None:
            self.on_batch(sum(job.cost for job in batch), time.perf_counter() - now)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    @staticmethod
    def _fail(batch: list[Job], error: Exception) -> None:
        for job in batch:
            if job.gone:
                job.future.cancel()  # nobody will read it
            elif not job.future.done():
                job.future.set_exception(error)
