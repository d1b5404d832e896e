"""One model, many clients: queued requests are merged, preprocessed, and run on the model in a pipeline.

Requests wait in one queue. The preparing thread takes everything that is waiting (up to ``max_batch_items``,
after at most ``wait_ms`` for more to arrive), groups the items by prompt and preprocesses each group with the
engine (decode, tokenise, AnyRes; in the engine's worker processes when it has ``num_workers``). The model
thread runs each prepared group (the engine sorts it by length and splits it into forward passes under its
token budget) while the next group is being prepared: preprocessing overlaps the forward passes, and one
prepared group at most waits for the model. There is never more than one forward pass at a time. A rejected
item fails its own request (with the engine's reason) and no other: when preparing a merged group raises,
its items are prepared one by one and an item that raises is that item's failure (a 400 for its request);
when the model fails on a merged group, each request is run alone, so that only the one it fails on gets
the 500. A 500 names no internals: the traceback is logged.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..encoder import E5V, Item, Prepared, as_item
from ..errors import InputError
from .metrics import Metrics
from .payload import RequestError

log = logging.getLogger(__name__)

#: What a failure on one item or group may never swallow. Anything else (tokenizers' PanicException is a
#: BaseException) fails the item or the group, never the batcher's threads.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


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


def _fail(jobs: list[Job], stage: str) -> None:
    for job in jobs:
        _resolve(job, error=RequestError(500, f"{stage} failed on this request; the server log has the details",
                                         kind="server_error"))


def _subset(prep: Prepared, start: int, stop: int) -> Prepared:
    """The part of a prepared group that belongs to positions ``start:stop``, re-indexed from 0."""
    keep = [k for k, i in enumerate(prep.ok_idx) if start <= i < stop]
    return Prepared([prep.ok_idx[k] - start for k in keep], [prep.names[k] for k in keep],
                    [prep.feats[k] for k in keep], [(i - start, e) for i, e in prep.skipped if start <= i < stop])


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
        self._ready: queue.Queue = queue.Queue(maxsize=1)  # a prepared group waiting for the model
        self._threads: list[threading.Thread] = []

    @property
    def queued_items(self) -> int:
        return self._queued

    def start(self) -> None:
        if not self._threads:
            self._stopping = False
            self._threads = [threading.Thread(target=self._prepare_loop, name="e5v-prepare", daemon=True),
                             threading.Thread(target=self._model_loop, name="e5v-model", daemon=True)]
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        """Finish the groups already taken, answer 503 to the requests still queued, stop both threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []

    async def embed(self, items: list[Item], prompt: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``(n, d)`` and token counts ``(n,)`` of ``items``, in order; raises :class:`RequestError`
        (400) naming the first rejected item, or 503 when the queue is full or the server is stopping."""
        loop = asyncio.get_running_loop()
        job = Job(list(items), prompt, kind, loop, loop.create_future())
        with self._cond:
            if self._stopping or not self._threads:
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

    def _prepare_loop(self) -> None:
        try:
            while True:
                self._ready.join()  # one group ahead of the model, no more: what arrives meanwhile is merged
                if (jobs := self._take()) is None:
                    break
                groups: dict[str, list[Job]] = {}
                for job in jobs:
                    groups.setdefault(job.prompt, []).append(job)
                for prompt, group in groups.items():
                    self._ready.put((group, self._prepare(prompt, group)))  # waits while the model is busy
        finally:
            self._ready.put(None)  # the model thread stops after the groups before it
            with self._cond:  # stopping: nobody will run what is left
                left, self._queue = list(self._queue), deque()
                self._queued = 0
            for job in left:
                _resolve(job, error=RequestError(503, "the server is shutting down", kind="server_error"))

    def _prepare(self, prompt: str, jobs: list[Job]) -> Prepared:
        """The group's items through the engine's preprocessing; never raises.

        This and :meth:`_run_group` are the engine's two steps for one window (``E5V.prepare_window`` and
        ``E5V.run_prepared``, so that the vectors are exactly the engine's), run on two threads."""
        model: E5V = self.model
        window = [(i, as_item(it, i, prompt)) for i, it in enumerate(it for job in jobs for it in job.items)]
        try:
            return model.prepare_window(window, prompt)
        except _FATAL:
            raise
        except BaseException:
            log.exception("preprocessing failed for a group of %d items; preparing them one by one", len(window))
        prep = Prepared()
        for i, item in window:
            try:
                one = model.prepare_window([(i, item)], prompt)
            except _FATAL:
                raise
            except BaseException as exc:
                log.exception("preprocessing failed for %s", item.name)
                one = Prepared(skipped=[(i, InputError(item.name, f"this item could not be prepared for the model "
                                                                  f"({type(exc).__name__}; the server log has the "
                                                                  "details)"))])
            prep.ok_idx += one.ok_idx
            prep.names += one.names
            prep.feats += one.feats
            prep.skipped += one.skipped
        return prep

    def _model_loop(self) -> None:
        while True:
            ready = self._ready.get()
            self._ready.task_done()  # picked up: the preparing thread may take the next requests
            if ready is None:
                return
            self._run_group(*ready)

    def _run_group(self, jobs: list[Job], prep: Prepared) -> None:
        items = sum(len(job.items) for job in jobs)
        self.metrics.observe_batch(items)
        try:
            res = self.model.run_prepared(prep)
        except _FATAL:
            raise
        except BaseException:  # a model failure fails these requests, never the worker
            log.exception("model call failed for %d items of %d request(s)", items, len(jobs))
            if len(jobs) == 1:
                return _fail(jobs, "the model")
            start = 0
            for job in jobs:  # each request alone: only the one the model fails on gets the 500
                self._run_group([job], _subset(prep, start, start + len(job.items)))
                start += len(job.items)
            return
        row = np.full(items, -1, dtype=np.int64)
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
