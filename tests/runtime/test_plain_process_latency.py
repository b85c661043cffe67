"""The latency a plain process gets: timed in a child that leaves glibc's allocator as it starts."""

from __future__ import annotations

import os

from tinybeauty_cli.runtime import plain_timing
from tinybeauty_cli.runtime.plain_timing import ALLOCATOR_ENV, allocator_hint, plain_process_latency

from tests.helpers import save_small


def test_a_plain_process_times_the_file_without_the_allocator_settings(tmp_path, monkeypatch):
    path = save_small(tmp_path / "small.pt")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")  # the parent's settings do not reach the child
    seen = {}
    real_run = plain_timing.subprocess.run

    def run(args, **kw):
        seen["env"] = kw["env"]
        return real_run(args, **kw)

    monkeypatch.setattr(plain_timing.subprocess, "run", run)
    figures = plain_process_latency(path, runs=3, warmup=1, threads=1)
    assert figures is not None and figures["p50_ms"] > 0 and figures["runs"] == 3 and figures["threads"] == 1
    assert "as a process starts" in figures["allocator"]
    assert not any(k.startswith("MALLOC_") for k in seen["env"]) and "MALLOC_TRIM_THRESHOLD_" in os.environ
    assert all(f"{k}={v}" in allocator_hint() for k, v in ALLOCATOR_ENV.items())


def test_a_file_the_child_cannot_time_gives_no_figure(tmp_path):
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"nothing")
    assert plain_process_latency(bad, runs=1, warmup=0) is None
