"""One command per output folder: a second ``tbopt optimize`` or ``tbopt run`` into a folder another one is
writing refuses at once, in one line naming the folder and the running process; a lock left by a killed
process does not block (the kernel releases ``flock``). Real processes, started side by side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinybeauty_cli.core.errors import OutputError
from tinybeauty_cli.core.files import LOCK_NAME, folder_lock

from ..helpers import save_small

SIZE = 32


def tbopt(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "tinybeauty_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def long_command(kind: str, ckpt: Path, out: Path) -> list:
    """A command that holds its folder for minutes: a long distillation."""
    if kind == "optimize":
        # no time budget: one expected to end before a million steps would not start the distillation
        return ["optimize", ckpt, "--out", out, "--for", "ios16", "--rates", "0.5", "--finetune-steps", "1000000",
                "--palettes", "pal8", "--sparsities", "", "--fit-steps", "0", "--limit", "2", "--threads", "1",
                "--time-budget", "0"]
    return ["run", ckpt, "--output", out, "--method", "channel", "--finetune-steps", "1000000", "--limit", "2",
            "--threads", "1"]


def second_command(kind: str, ckpt: Path, out: Path) -> list:
    return {
        "optimize": ["optimize", ckpt, "--out", out, "--limit", "2", "--threads", "1"],
        "optimize --resume": ["optimize", ckpt, "--out", out, "--resume", "--limit", "2", "--threads", "1"],
        "optimize --force": ["optimize", ckpt, "--out", out, "--force", "--limit", "2", "--threads", "1"],
        "run": ["run", ckpt, "--output", out, "--limit", "2", "--threads", "1"],
        "run --force": ["run", ckpt, "--output", out, "--force", "--limit", "2", "--threads", "1"],
    }[kind]


def wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 240.0) -> str:
    """The lock file's record once the process holding it has written its pid."""
    lock = out / LOCK_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the first command ended: {proc.communicate()}")
        text = lock.read_text() if lock.exists() else ""
        if f"pid {proc.pid}:" in text:
            return text
        time.sleep(0.2)
    raise AssertionError("the first command did not take its lock")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_small(tmp_path_factory.mktemp("lock") / "tiny.pt", size=SIZE)


PAIRS = [("optimize", "optimize"), ("optimize", "optimize --resume"), ("optimize", "optimize --force"),
         ("run", "run"), ("run", "run --force"), ("optimize", "run"), ("run", "optimize --resume")]
QUICK = {("optimize", "optimize --resume"), ("run", "run --force")}  # the rest: -m slow (each starts two processes)


@pytest.mark.parametrize(("first", "second"), [
    pytest.param(a, b, id=f"{a}+{b}", marks=[] if (a, b) in QUICK else [pytest.mark.slow]) for a, b in PAIRS])
def test_a_second_command_into_a_busy_folder_refuses_at_once(ckpt, tmp_path, first, second):
    out = tmp_path / "out"
    holder = tbopt(*long_command(first, ckpt, out))
    try:
        wait_for_lock(out, holder)
        before = sorted(p.name for p in out.rglob("*"))
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "tinybeauty_cli", *map(str, second_command(second, ckpt, out))],
                           capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
                           timeout=300)
        elapsed = time.monotonic() - t0
        assert r.returncode == 1, (r.returncode, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert lines[0].startswith("Error: ") and all(line.startswith("Hint: ") for line in lines[1:]), r.stderr
        assert str(out) in lines[0] and f"pid {holder.pid}" in lines[0] and f"tbopt {first}" in lines[0], lines[0]
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert elapsed < 120, elapsed  # start-up only: no work was done
        assert holder.poll() is None  # the running command goes on, its files untouched
        assert set(before) <= set(p.name for p in out.rglob("*"))
    finally:
        stop(holder)


@pytest.mark.parametrize("kind", ["optimize", pytest.param("run", marks=pytest.mark.slow)])
def test_a_lock_left_by_a_killed_process_does_not_block(ckpt, tmp_path, kind):
    out = tmp_path / "out"
    first = tbopt(*long_command(kind, ckpt, out))
    try:
        wait_for_lock(out, first)
    finally:
        stop(first)  # kill -9: the lock file stays, the kernel has released the lock
    assert (out / LOCK_NAME).exists()
    again = tbopt(*long_command(kind, ckpt, out), *(["--resume"] if kind == "optimize" else ["--force"]))
    try:
        record = wait_for_lock(out, again)
        assert record.startswith(f"pid {again.pid}: tbopt {kind}")
    finally:
        stop(again)


def test_the_lock_is_released_and_its_file_and_folder_removed(tmp_path):
    folder = tmp_path / "made" / "here"
    with folder_lock(folder, "tbopt test"):
        assert (folder / LOCK_NAME).read_text() == f"pid {os.getpid()}: tbopt test\n"
        with pytest.raises(OutputError, match=f"in use by another tbopt command \\(pid {os.getpid()}: tbopt test\\)"):
            with folder_lock(folder, "tbopt other"):  # another open file description: flock refuses it too
                pass
    assert not (tmp_path / "made").exists()  # nothing was written: the folders made for the lock went too
    with folder_lock(folder, "tbopt test"):  # and it can be taken again
        (folder / "result.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["result.txt"]
