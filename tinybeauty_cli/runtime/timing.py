"""Latency: warm-up, then many timed calls; median and 90th percentile, threads stated.

Several functions can be timed with their runs interleaved, so that on a shared machine
they see the same load and their ratio is fair even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..core.contexts import torch_threads


@dataclass
class Latency:
    """Per-call latency in milliseconds after warm-up."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int

    @property
    def images_per_second(self) -> float:
        return 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


def measure_latency(fn: Callable[[], object], runs: int = 30, warmup: int = 5,
                    threads: int | None = None, on_run: Callable[[], None] | None = None) -> Latency:
    """Call ``fn`` ``warmup`` times, then time ``runs`` calls; median and 90th percentile.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (restored after).
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    with torch_threads(threads):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
            if on_run is not None:
                on_run()
        used = torch.get_num_threads()
    return _latency(times, warmup, used)


def _latency(times_ms: list[float], warmup: int, threads: int) -> Latency:
    ts = sorted(times_ms)
    p90 = ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]
    return Latency(statistics.median(ts), p90, statistics.fmean(ts), ts[0], len(ts), warmup, threads)


def measure_latencies(fns: dict[str, Callable[[], object]], runs: int = 30, warmup: int = 5,
                      threads: int | None = None) -> dict[str, Latency]:
    """:func:`measure_latency` for several functions with their runs interleaved (A, B, A, B, ...).

    On a shared machine the load changes from second to second; interleaving makes every
    function see the same conditions, so their ratio is fair even when absolute times drift.
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    with torch_threads(threads):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1000.0)
        used = torch.get_num_threads()
    return {name: _latency(ts, warmup, used) for name, ts in times.items()}
