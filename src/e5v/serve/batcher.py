"""One model, many clients: a single worker thread merges queued requests and runs them on the model.

Requests wait in one queue. The worker takes everything that is waiting (up to ``max_batch_items``, after
at most ``wait_ms`` for more to arrive), groups the items by prompt, and calls :meth:`E5V.embed` once per
group; the engine sorts them by length and splits them into forward passes under its token budget. There is
never more than one forward pass at a time. ``embed`` never raises for a bad item, so a rejected item
fails its own request (with the engine's reason) and no other.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..encoder import Item
from .metrics import Metrics
from .payload import RequestError

log = logging.getLogger(__name__)


@dataclass
class Job:
    items: list[Item]
    prompt: str
    kind: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    def finish():
        if job.future.done():  # the client went away
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(finish)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass


class Batcher:
    def __init__(self, model, *, metrics: Metrics | None = None, max_batch_items: int = 256,
                 max_queue_items: int = 4096, wait_ms: float = 2.0):
        self.model = model
        self.metrics = metrics or Metrics()
        self.max_batch_items = int(max_batch_items)
        self.max_queue_items = int(max_queue_items)
        self.wait = max(0.0, wait_ms) / 1000.0
        self._queue: deque[Job] = deque()
        self._queued = 0  # items waiting
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued_items(self) -> int:
        return self._queued

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="e5v-model", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def embed(self, items: list[Item], prompt: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``(n, d)`` and token counts ``(n,)`` of ``items``, in order; raises :class:`RequestError`
        (400) naming the first rejected item, or 503 when the queue is full or the server is stopping."""
        loop = asyncio.get_running_loop()
        job = Job(list(items), prompt, kind, loop, loop.create_future())
        with self._cond:
            if self._stopping or self._thread is None:
                raise RequestError(503, "the server is shutting down", kind="server_error")
            if self._queued and self._queued + len(items) > self.max_queue_items:
                raise RequestError(503, f"server busy ({self._queued} items queued); retry later", kind="server_error")
            self._queue.append(job)
            self._queued += len(items)
            self._cond.notify()
        return await job.future

    # --- worker ----------------------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.wait
            while self._queued < self.max_batch_items and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, n = [], 0
            while self._queue and (not jobs or n + len(self._queue[0].items) <= self.max_batch_items):
                job = self._queue.popleft()
                jobs.append(job)
                n += len(job.items)
            self._queued -= n
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            groups: dict[str, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.prompt, []).append(job)
            for prompt, group in groups.items():
                self._run_group(prompt, group)
        with self._cond:  # stopping: nobody will run what is left
            left, self._queue = list(self._queue), deque()
            self._queued = 0
        for job in left:
            _resolve(job, error=RequestError(503, "the server is shutting down", kind="server_error"))

    def _run_group(self, prompt: str, jobs: list[Job]) -> None:
        items = [it for job in jobs for it in job.items]
        self.metrics.observe_batch(len(items))
        try:
            res = self.model.embed(items, prompt=prompt)
        except Exception as exc:  # a model failure fails these requests, never the worker
            log.exception("model call failed for %d items", len(items))
            for job in jobs:
                _resolve(job, error=RequestError(500, f"the model failed: {type(exc).__name__}: {exc}",
                                                 kind="server_error"))
            return
        row = np.full(len(items), -1, dtype=np.int64)
        row[res.indices] = np.arange(len(res.indices))
        bad = dict(res.skipped)
        start = 0
        for job in jobs:
            stop = start + len(job.items)
            errors = [bad[i] for i in range(start, stop) if i in bad]
            if errors:
                _resolve(job, error=RequestError.from_input(errors[0]))
            else:
                rows = row[start:stop]
                self.metrics.add_items(job.kind, len(rows))
                _resolve(job, (res.vectors[rows], res.tokens[rows]))
            start = stop
