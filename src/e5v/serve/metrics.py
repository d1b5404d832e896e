"""Counters and histograms for ``GET /metrics`` in the Prometheus text format (version 0.0.4).

Kept in-process and per app (no global registry), so several apps in one process count apart.
"""
from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for b, c in zip(self.buckets, self.counts):
            total += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Requests by endpoint and status, errors, items embedded by kind, merged batch sizes, latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> n
        self.items: Counter = Counter()  # kind -> n
        self.batches = Histogram(BATCH_BUCKETS)
        self.latency: dict[str, Histogram] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, items: int) -> None:
        with self._lock:
            self.batches.observe(items)

    def add_items(self, kind: str, n: int) -> None:
        with self._lock:
            self.items[kind] += n

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to (help, value)."""
        with self._lock:
            out = ["# HELP e5v_requests_total HTTP requests by endpoint and status.",
                   "# TYPE e5v_requests_total counter"]
            out += [f'e5v_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP e5v_request_errors_total HTTP requests answered with a status >= 400.",
                    "# TYPE e5v_request_errors_total counter"]
            errors: Counter = Counter()
            for (e, s), n in self.requests.items():
                errors[e] += n if s >= 400 else 0
            out += [f'e5v_request_errors_total{{endpoint="{e}"}} {n}' for e, n in sorted(errors.items())]
            out += ["# HELP e5v_items_embedded_total Items embedded, by kind (text, image, composed).",
                    "# TYPE e5v_items_embedded_total counter"]
            out += [f'e5v_items_embedded_total{{kind="{k}"}} {n}' for k, n in sorted(self.items.items())]
            out += ["# HELP e5v_batch_items Items per merged model call (requests of many clients together).",
                    "# TYPE e5v_batch_items histogram"]
            out += self.batches.lines("e5v_batch_items")
            out += ["# HELP e5v_request_seconds Request latency by endpoint.",
                    "# TYPE e5v_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("e5v_request_seconds", f'endpoint="{e}"')
        for name, (help_, value) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"
