"""How busy the machine was: the load average beside every latency, so that a time taken while other
jobs shared the CPU is not read as a property of the model."""

from __future__ import annotations

import os
from typing import Any, Iterable


def load_average() -> float | None:
    """The 1-minute load average (``os.getloadavg``), None where the OS keeps none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cores() -> int:
    return os.cpu_count() or 1


def highest(latencies: Iterable[Any]) -> float | None:
    """The highest ``load_average`` among latency records (None when none has one)."""
    loads = [lat.load_average for lat in latencies if lat is not None and getattr(lat, "load_average", None) is not None]
    return max(loads) if loads else None


def load_text(load: float | None) -> str:
    """``load average 1.90 on 2 cores``, for captions."""
    return f"load average {'unknown' if load is None else f'{load:.2f}'} on {cores()} cores"


def overload_note(load: float | None) -> str | None:
    """One line when the load average exceeded the cores while timing, else None."""
    if load is None or load <= cores():
        return None
    return (f"Note: the {load_text(load)} exceeded the cores while timing: other jobs shared the CPU, so these "
            "latencies say as much about the machine's load as about the models; time again on an idle machine")
