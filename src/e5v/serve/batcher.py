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

from ..encoder import E5V
from ..errors import InputError
from ..items import Item, as_item
from ..prepare import Prepared
from .metrics import Metrics
from .errors import RequestError

log = logging.getLogger(__name__)

#: What a failure on one item or group may never swallow. Anything else (tokenizers' PanicException is a
#: BaseException) fails the item or the group, never the batcher's threads.
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass
class PendingRequest:
    """One request's items waiting for the model, and the future its handler awaits on ``loop``."""

    items: list[Item]
    prompt: str
    kind: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(request: PendingRequest, result=None, error: BaseException | None = None) -> None:
    def finish():
        if request.future.done():  # the client went away
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    try:
        request.loop.call_soon_threadsafe(finish)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass


def _fail(requests: list[PendingRequest], stage: str) -> None:
    for request in requests:
        _resolve(request, error=RequestError(500, f"{stage} failed on this request; the server log has the details",
                                         kind="server_error"))


def _subset(prep: Prepared, start: int, stop: int) -> Prepared:
    """The part of a prepared group that belongs to positions ``start:stop``, re-indexed from 0."""
    keep = [k for k, i in enumerate(prep.ok_idx) if start <= i < stop]
    return Prepared([prep.ok_idx[k] - start for k in keep], [prep.names[k] for k in keep],
                    [prep.feats[k] for k in keep], [(i - start, e) for i, e in prep.skipped if start <= i < stop])


class RequestBatcher:
    """The queue of :class:`PendingRequest` and the two threads (preparing, model) that answer them."""

    def __init__(self, model, *, metrics: Metrics | None = None, max_batch_items: int = 256,
                 max_queue_items: int = 4096, wait_ms: float = 2.0):
        self.model = model
        self.metrics = metrics or Metrics()
        self.max_batch_items = int(max_batch_items)
        self.max_queue_items = int(max_queue_items)
        self.wait = max(0.0, wait_ms) / 1000.0
        self._queue: deque[PendingRequest] = deque()
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
        request = PendingRequest(list(items), prompt, kind, loop, loop.create_future())
        with self._cond:
            if self._stopping or not self._threads:
                raise RequestError(503, "the server is shutting down", kind="server_error")
            if self._queued and self._queued + len(items) > self.max_queue_items:
                raise RequestError(503, f"server busy ({self._queued} items queued); retry later", kind="server_error")
            self._queue.append(request)
            self._queued += len(items)
            self._cond.notify()
        return await request.future

    # --- worker ----------------------------------------------------------------------------------------
    def _take(self) -> list[PendingRequest] | None:
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
            requests, n = [], 0
            while self._queue and (not requests or n + len(self._queue[0].items) <= self.max_batch_items):
                request = self._queue.popleft()
                requests.append(request)
                n += len(request.items)
            self._queued -= n
            return requests

    def _prepare_loop(self) -> None:
        try:
            while True:
                self._ready.join()  # one group ahead of the model, no more: what arrives meanwhile is merged
                if (requests := self._take()) is None:
                    break
                groups: dict[str, list[PendingRequest]] = {}
                for request in requests:
                    groups.setdefault(request.prompt, []).append(request)
                for prompt, group in groups.items():
                    self._ready.put((group, self._prepare(prompt, group)))  # waits while the model is busy
        finally:
            self._ready.put(None)  # the model thread stops after the groups before it
            with self._cond:  # stopping: nobody will run what is left
                left, self._queue = list(self._queue), deque()
                self._queued = 0
            for request in left:
                _resolve(request, error=RequestError(503, "the server is shutting down", kind="server_error"))

    def _prepare(self, prompt: str, requests: list[PendingRequest]) -> Prepared:
        """The group's items through the engine's preprocessing; never raises.

        This and :meth:`_run_group` are the engine's two steps for one window (``E5V.prepare_window`` and
        ``E5V.run_prepared``, so that the vectors are exactly the engine's), run on two threads."""
        model: E5V = self.model
        items = (it for request in requests for it in request.items)
        window = [(i, as_item(it, i, prompt)) for i, it in enumerate(items)]
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

    def _run_group(self, requests: list[PendingRequest], prep: Prepared) -> None:
        items = sum(len(request.items) for request in requests)
        self.metrics.observe_batch(items)
        try:
            res = self.model.run_prepared(prep)
        except _FATAL:
            raise
        except BaseException:  # a model failure fails these requests, never the worker
            log.exception("model call failed for %d items of %d request(s)", items, len(requests))
            if len(requests) == 1:
                return _fail(requests, "the model")
            start = 0
            for request in requests:  # each request alone: only the one the model fails on gets the 500
                self._run_group([request], _subset(prep, start, start + len(request.items)))
                start += len(request.items)
            return
        row = np.full(items, -1, dtype=np.int64)
        row[res.indices] = np.arange(len(res.indices))
        bad = dict(res.skipped)
        start = 0
        for request in requests:
            stop = start + len(request.items)
            errors = [bad[i] for i in range(start, stop) if i in bad]
            if errors:
                _resolve(request, error=RequestError.from_input(errors[0]))
            else:
                rows = row[start:stop]
                self.metrics.add_items(request.kind, len(rows))
                _resolve(request, (res.vectors[rows], res.tokens[rows]))
            start = stop
