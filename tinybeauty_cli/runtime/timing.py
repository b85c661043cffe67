"""Latency: warm-up, then many timed calls; median and 90th percentile, threads stated.

Several functions can be timed with their runs interleaved, so that on a shared machine
they see the same load and their ratio is fair even when absolute times drift.

Freed memory stays with the process while tbopt times (:func:`steady_allocator`). With glibc's
defaults, malloc hands the large activation buffers of a forward pass back to the system when they
are freed (it trims the heap, or unmaps buffers above its mmap threshold), and the next call pays a
page fault for every 4 KB it touches again. Whether that happens depends on what the process
allocated before, so the same int8 file timed in two processes differed 2.5x: the unpruned int8 demo
at 2 threads took 5.2 ms with memory kept and 13.4 ms (median) without, in the same run (AMD EPYC).
Allocators made for serving (jemalloc, tcmalloc, which PyTorch's CPU tuning guide recommends) keep
the memory; so does an app that sets ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..core.contexts import torch_threads
from ..core.load import cores, load_average

#: glibc's mallopt parameters (malloc.h): keep up to 1 GB free at the top of the heap, and serve
#: blocks up to 32 MB (the largest threshold glibc accepts) from the heap instead of fresh mappings.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES, _MMAP_BYTES = 1 << 30, 32 << 20
_ALLOCATOR: str | None = None


def steady_allocator() -> str:
    """Make this process keep the memory it frees (glibc), once; returns what the timings ran with.

    A C library call through ctypes: Python has no binding for ``mallopt``, and the environment
    variables that do the same are read only when a process starts.
    """
    global _ALLOCATOR
    if _ALLOCATOR is None:
        _ALLOCATOR = "the system allocator as configured"
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES) == 1:
                    _ALLOCATOR = "glibc malloc keeping freed memory (trim threshold 1 GB, mmap threshold 32 MB)"
            except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
                pass
    return _ALLOCATOR


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
    allocator: str = ""  # how freed memory was handled while timing (:func:`steady_allocator`)
    #: the machine's 1-minute load average when timing ended, and its cores: a time taken while
    #: other jobs ran says more about the machine than about the model (None where the OS has none)
    load_average: float | None = None
    cpus: int = 0

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
    steady_allocator()
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
    return Latency(statistics.median(ts), p90, statistics.fmean(ts), ts[0], len(ts), warmup, threads,
                   steady_allocator(), load_average(), cores())


def measure_latencies(fns: dict[str, Callable[[], object]], runs: int = 30, warmup: int = 5,
                      threads: int | None = None) -> dict[str, Latency]:
    """:func:`measure_latency` for several functions with their runs interleaved (A, B, A, B, ...).

    On a shared machine the load changes from second to second; interleaving makes every
    function see the same conditions, so their ratio is fair even when absolute times drift.
    """
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    steady_allocator()
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
