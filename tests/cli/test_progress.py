"""Progress that reaches people.

Bars when stderr is a terminal; otherwise plain lines on stderr (when a step starts, at least every
``interval`` seconds with done/total, elapsed and eta, when it ends); nothing under --quiet/--json.
Every long step reports: channel ranking and refit, quantize's graph rewrites and lowering, the
built-in test set, Core ML export, measurement.
"""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from tinybeauty_cli.cli import _output
from tinybeauty_cli.core.images import builtin_test_set

from tests.helpers import run


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    out = _output.Output(interval=0.05)
    assert not out.draws_bars  # pytest's captured stderr is not a terminal
    seen = []
    with out.task("ranking", total=4) as advance:
        advance(1, loss=0.25)
        assert _wait_for(lambda: seen.append(capsys.readouterr().err) or "1/4" in "".join(seen))
        advance(3)
    lines = ("".join(seen) + capsys.readouterr().err).splitlines()
    assert lines[0] == "ranking: started (4 to do)"
    assert any(re.fullmatch(r"ranking: 1/4 \(25%\), elapsed \d+:\d\d, eta \d+:\d\d, loss 0.25", line)
               for line in lines), lines
    assert re.fullmatch(r"ranking: done in \d+:\d\d", lines[-1]), lines


def test_a_status_line_at_least_every_interval_even_without_advance(capsys):
    out = _output.Output(interval=0.05)
    seen = []
    with out.task("converting", total=4) as advance:
        advance(1)
        assert _wait_for(lambda: seen.append(capsys.readouterr().err) or "eta" in "".join(seen))
    text = "".join(seen) + capsys.readouterr().err
    status = [line for line in text.splitlines() if "eta" in line]
    assert status, text
    assert re.fullmatch(r"converting: 1/4 \(25%\), elapsed \d+:\d\d, eta \d+:\d\d", status[0]), status[0]


def test_status_of_a_step_without_a_total_says_elapsed(capsys):
    out = _output.Output(interval=0.05)
    seen = []
    with out.task("timing", total=None):
        assert _wait_for(lambda: seen.append(capsys.readouterr().err) or "elapsed" in "".join(seen))
    text = "".join(seen) + capsys.readouterr().err
    assert re.search(r"^timing: elapsed \d+:\d\d$", text, re.M), text


@pytest.mark.parametrize("mode", [{"quiet": True}, {"json_mode": True}])
def test_quiet_and_json_print_no_progress(capsys, mode):
    out = _output.Output(interval=0.01, **mode)
    with out.task("step", total=2) as advance:
        advance(1)
        time.sleep(0.1)
        advance(1)
    assert capsys.readouterr().err == ""


def test_bars_when_stderr_is_a_terminal_and_tasks_nest(monkeypatch, capsys):
    tty = io.StringIO()
    monkeypatch.setattr(_output, "stderr", Console(file=tty, force_terminal=True, width=100))
    out = _output.Output(interval=0.01)
    assert out.draws_bars
    with out.task("outer", total=2) as a:
        with out.task("inner", total=3) as b:  # one live display for both (Rich allows only one)
            b(3)
        a(2)
    assert "outer" in tty.getvalue() and "inner" in tty.getvalue()
    assert capsys.readouterr().err == ""  # no plain lines besides the bars


def test_the_built_in_test_set_reports_its_drawing(capsys):
    out = _output.Output()
    images = builtin_test_set(28, limit=2, progress=out)  # a size no other test draws
    assert len(images) == 2
    err = capsys.readouterr().err
    assert "building the built-in test set: started (2 to do)" in err and "building the built-in test set: done" in err


def _step_lines(stderr: str) -> set[str]:
    return {line.rsplit(": started", 1)[0] for line in stderr.splitlines() if ": started" in line}


def test_channel_pruning_reports_ranking_refit_and_fine_tuning(small_artifact, tmp_path, photos):
    r = run("prune", small_artifact, "--rate", "0.3", "--method", "channel", "--finetune-steps", "1", "--limit", "1",
            "--calib", photos, "-o", tmp_path / "p.pt")
    assert r.exit_code == 0, r.stderr
    steps = _step_lines(r.stderr)
    for step in ("channel pruning: activations for ranking", "channel pruning: dependency graph",
                 "channel pruning: refitting convs", "fine-tuning (distillation)", "scoring the pruned model"):
        assert step in steps, (step, r.stderr)
    assert re.search(r"^channel pruning: refitting convs: done in \d+:\d\d$", r.stderr, re.M), r.stderr


def test_quantize_reports_rewrites_calibration_and_lowering(small_artifact, tmp_path):
    r = run("quantize", small_artifact, "--backend", "x86", "--calib-count", "2", "--limit", "1", "--threads", "1",
            "--keep-float", "none", "-o", tmp_path / "q.pt")  # synthetic calibration: its drawing reports too
    assert r.exit_code == 0, r.stderr
    steps = _step_lines(r.stderr)
    for step in ("graph rewrites (exact, checked on calibration images)", "calibrating (x86)",
                 "lowering to TorchScript (x86)", "scoring int8 model", "timing float vs int8",
                 "drawing synthetic portraits"):
        assert step in steps, (step, r.stderr)


def test_export_and_bench_report(small_artifact, tmp_path):
    r = run("export", small_artifact, "-o", tmp_path / "m.mlpackage", "--weights", "int8")
    assert r.exit_code == 0, r.stderr
    assert "exporting m.mlpackage" in _step_lines(r.stderr), r.stderr
    r = run("bench", small_artifact, tmp_path / "m.mlpackage", "--limit", "1", "--runs", "2", "--warmup", "0")
    assert r.exit_code == 0, r.stderr
    steps = _step_lines(r.stderr)
    assert {"scoring small.pt", "scoring m.mlpackage", "timing small.pt", "timing m.mlpackage"} <= steps, r.stderr


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_no_progress_lines_under_quiet_or_json(small_artifact, tmp_path, flag, photos):
    r = run("prune", small_artifact, "--rate", "0.3", "--method", "channel", "--finetune-steps", "1", "--limit", "1",
            "--calib", photos, "-o", tmp_path / "p.pt", flag)
    assert r.exit_code == 0, r.stderr
    assert ": started" not in r.stderr and "done in" not in r.stderr, r.stderr
