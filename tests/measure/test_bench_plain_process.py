"""tbopt bench times int8 TorchScript files twice: with freed memory kept (tbopt's timings) and in a
plain Python process (glibc's allocator as a process starts); it says which is which and the one line
that gives a user's process the faster one. Float files and --no-timing get neither extra run."""

from __future__ import annotations

import json

import pytest

from tinybeauty_cli.runtime.plain_timing import PLAIN_ALLOCATOR, allocator_hint

from tests.helpers import run, run_ok, save_small_and_int8

FAST = ["--limit", "1", "--runs", "3", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def float_and_int8(tmp_path_factory):
    src, out, _ = save_small_and_int8(tmp_path_factory.mktemp("bench_plain"))
    return src, out


def test_json_has_both_figures_for_int8_and_none_for_float(float_and_int8, tmp_path):
    src, int8 = float_and_int8
    md = tmp_path / "b.md"
    d = json.loads(run_ok("bench", src, int8, *FAST, "--json", "--markdown", md).stdout)
    fl, q = d["rows"]
    assert fl["plain_process_p50_ms"] is None and fl["plain_process_timed_with"] is None
    assert fl["latency_p50_ms"] > 0
    assert q["kind"] == "int8" and q["latency_p50_ms"] > 0 and q["plain_process_p50_ms"] > 0
    assert q["plain_process_timed_with"] == PLAIN_ALLOCATOR
    assert q["latency_timed_with"] and q["latency_timed_with"] != PLAIN_ALLOCATOR
    assert d["faster_with"] == allocator_hint() and "MALLOC_TRIM_THRESHOLD_=" in d["faster_with"]
    text = md.read_text()
    assert "plain p50 (ms)" in text and allocator_hint() in text


def test_table_names_which_is_which_and_prints_the_hint(float_and_int8):
    _, int8 = float_and_int8
    r = run_ok("bench", int8, *FAST)
    flat = " ".join(r.stdout.replace("│", " ").split())
    assert "plain p50" in flat and "plain Python process" in flat
    assert allocator_hint() in flat


def test_float_only_and_no_timing_skip_the_plain_process(float_and_int8):
    src, int8 = float_and_int8
    d = json.loads(run_ok("bench", src, *FAST, "--json").stdout)
    assert "faster_with" not in d and d["rows"][0]["plain_process_p50_ms"] is None
    r = run("bench", int8, *FAST, "--no-timing", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["rows"][0]["plain_process_p50_ms"] is None and d["rows"][0]["latency_p50_ms"] is None
    assert "faster_with" not in d
