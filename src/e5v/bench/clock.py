"""The benchmark's clock: wall time and peak accelerator memory of one measured call."""
from __future__ import annotations

import time


class Clock:
    """Times a call: ``result, seconds, peak_gib = clock(fn)`` (peak memory on CUDA only, else None)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __call__(self, fn):
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return result, seconds, peak
