"""Preprocessing in worker processes: decode, validate, tokenise and resize items away from the process
that runs the model, so that the accelerator never waits for the CPU.

The workers are started by :func:`start_context` (forkserver or spawn: safe with CUDA and threads) and
receive only what preprocessing needs: a :class:`~e5v.prepare.Preparer` holding the tokenizer, the image
processor and the prompt settings, never the model. Results travel back as numpy arrays (plain pickles, no
shared-memory file handles) and are turned into tensors again here. A worker that dies raises a clear
:class:`~e5v.errors.E5VError` instead of hanging the caller.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .errors import E5VError, InputError

log = logging.getLogger(__name__)

_PREPARER = None  # set once in each worker by _init


def _init(preparer) -> None:
    global _PREPARER
    import torch

    torch.set_num_threads(1)  # one core per worker: N workers use N cores, not N x all of them
    _PREPARER = preparer


def _prepare_chunk(chunk: list[tuple[int, Any]], prompt: str, preparer=None) -> list[tuple]:
    """Runs in a worker (or here, with ``preparer``): ``(index, name, ids, images, None)`` per good item,
    ``(index, name, None, None, InputError)`` per rejected one."""
    out = []
    for i, item in chunk:
        try:
            f = (preparer or _PREPARER).prepare(item, prompt)
        except InputError as err:
            out.append((i, err.item, None, None, err))
            continue
        out.append((i, item.name, f.input_ids.numpy(), {k: v.numpy() for k, v in f.images.items()}, None))
    return out


#: Imported once by the fork server, so that forked workers start without importing them again.
PRELOAD = ["e5v.prepare", "transformers.processing_utils", "transformers.image_processing_utils",
           "transformers.tokenization_utils_tokenizers"]


def start_context():
    """``forkserver`` where the platform has it (a clean server process that imports torch and transformers
    once, then forks each worker in milliseconds), else ``spawn``; ``E5V_WORKER_START=spawn`` forces spawn.
    Both start workers from a process that never touched CUDA, and both pickle what the workers get."""
    methods = multiprocessing.get_all_start_methods()
    method = os.environ.get("E5V_WORKER_START") or ("forkserver" if "forkserver" in methods else "spawn")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


class PreparePool:
    """``num_workers`` worker processes that run :meth:`Preparer.prepare` on chunks of a window."""

    def __init__(self, preparer, num_workers: int):
        self.num_workers = int(num_workers)
        self._preparer = preparer
        self._executor = ProcessPoolExecutor(self.num_workers, mp_context=start_context(),
                                             initializer=_init, initargs=(preparer,))
        log.info("started %d preprocessing worker processes", self.num_workers)

    def submit(self, window: list[tuple[int, Any]], prompt: str) -> list[tuple[Future, list, str]]:
        """Queue a window of ``(index, Item)``; returns handles for :meth:`collect` or :meth:`cancel`. Returns at
        once."""
        size = max(1, min(16, -(-len(window) // (4 * self.num_workers))))
        chunks = [window[k:k + size] for k in range(0, len(window), size)]
        try:
            return [(self._executor.submit(_prepare_chunk, chunk, prompt), chunk, prompt) for chunk in chunks]
        except BrokenProcessPool as exc:
            raise self._broken(exc) from None

    @staticmethod
    def cancel(handles) -> None:
        """Drop submitted work that will not be collected."""
        for fut, _, _ in handles:
            fut.cancel()

    def collect(self, handles: list[tuple[Future, list, str]]) -> list[tuple]:
        """Wait for a submitted window: one ``(index, name, Features | None, InputError | None)`` per item, in
        order."""
        from .backbones import Features
        import torch

        rows = []
        try:
            for fut, chunk, prompt in handles:
                try:
                    done = fut.result()
                except (BrokenProcessPool, E5VError):
                    raise
                except Exception:  # the chunk never reached a worker (an item that cannot be pickled): here, then
                    log.debug("preparing a chunk of %d items in this process", len(chunk), exc_info=True)
                    done = _prepare_chunk(chunk, prompt, self._preparer)
                for i, name, ids, images, err in done:
                    feats = None if err is not None else Features(
                        torch.from_numpy(ids), {k: torch.from_numpy(v) for k, v in images.items()})
                    rows.append((i, name, feats, err))
        except BrokenProcessPool as exc:
            self.cancel(handles)
            raise self._broken(exc) from None
        except BaseException:
            self.cancel(handles)
            raise
        return rows

    def _broken(self, exc) -> E5VError:
        self.close()
        return E5VError(f"a preprocessing worker process died unexpectedly ({exc}); the engine's workers were "
                        "stopped. Out of memory? Retry with fewer workers (num_workers / --workers) or 0.")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    @property
    def closed(self) -> bool:
        return self._executor is None
