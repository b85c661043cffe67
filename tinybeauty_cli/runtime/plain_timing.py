"""The latency a plain Python process gets from a model file: timed in a fresh process that leaves
glibc's allocator as it starts (no ``mallopt``, no ``MALLOC_*`` variables), unlike tbopt's own
timings (:func:`.timing.steady_allocator`). ``python -m tinybeauty_cli.runtime.plain_timing FILE``
prints the figures as JSON; :func:`plain_process_latency` runs it.

The timing loop is written here rather than taken from :mod:`.timing`, whose functions set the
allocator first: that is the one thing this process must not do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The environment variables that do what :func:`.timing.steady_allocator` does, for a user's process
#: (glibc reads them when a process starts; the values are the ones tbopt sets).
ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
#: What the child's timings ran with.
PLAIN_ALLOCATOR = "glibc malloc as a process starts"


def allocator_hint() -> str:
    """The one line that gives a user's process the faster figure."""
    return " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()) + " python your_app.py"


def plain_process_latency(path: Path | str, runs: int = 30, warmup: int = 5, threads: int | None = None,
                          timeout: float = 600.0) -> dict[str, Any] | None:
    """``path`` timed in a plain process (batch 1, median of ``runs`` after ``warmup``); None when the
    child could not time it (its error is not this command's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    args = [sys.executable, "-m", __name__, str(path), "--runs", str(runs),  # this module, as the child
            "--warmup", str(warmup)] + (["--threads", str(threads)] if threads else [])
    try:
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="time a model file in a plain process")
    p.add_argument("path", type=Path)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    import torch  # noqa: PLC0415 - only in the child

    from ..core.checkpoint import load_model  # noqa: PLC0415
    from ..core.images import builtin_test_set, uint8_to_model  # noqa: PLC0415
    from .runners import runner_for  # noqa: PLC0415

    if a.threads:
        torch.set_num_threads(a.threads)
    runner = runner_for(load_model(a.path))
    x = uint8_to_model(builtin_test_set(runner.preprocessing.size, 1).inputs)
    for _ in range(a.warmup):
        runner.predict(x)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        runner.predict(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    print(json.dumps({"p50_ms": round(statistics.median(times), 3), "runs": a.runs, "warmup": a.warmup,
                      "threads": torch.get_num_threads(), "allocator": PLAIN_ALLOCATOR}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
