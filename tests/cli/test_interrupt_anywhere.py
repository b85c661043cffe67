"""Issue 20, class 7: one Ctrl-C at any moment ends any command with exit 130 and one line, leaving
nothing behind (no output, no temporary file) and the inputs as they were.

Two ways an interrupt was lost: a library catches everything around an import or a callback
(PyTorch's C extension importing numpy, C++ importing ``torch._dynamo`` during fx tracing,
coremltools' optional imports), so the command went on and wrote its file, or tripped later over
the half-imported module (``internal error: AttributeError: module 'torch._dynamo' has no attribute
'guards'``). The commands now import those modules before their work (``cli._imports``) and note
every interrupt (``core.interrupts``), so that one a library drops still ends the command.

The default run interrupts ``tbopt quantize`` at the moments of the issue and checks the net
in-process; the sweep over every command, every 0.5 s from 0.5 s to its end, is slow.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.artifact import Artifact, HistoryStep, Preprocessing, save_artifact

from ..helpers import small_tinybeauty

ROOT = Path(__file__).resolve().parents[2]
INTERRUPTED = "Error: interrupted; no partial or temporary file was left behind"
ENGINE = next(e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines)
SIZE = 64

#: Each command on small inputs, ``{out}`` the folder its outputs go to.
COMMANDS = {
    "prune": "prune {model} --rate 0.3 --method channel --finetune-steps 30 --limit 2 -o {out}/p.pt",
    "quantize": "quantize {model} --calib-count 8 --limit 4 --threads 1 -o {out}/q.pt",
    "export": "export {model} -o {out}/m.mlpackage",
    "run": f"run {{model}} -o {{out}}/run --limit 2 --calib-count 2 --runs 2 --threads 1 --backend {ENGINE}",
    "optimize": "optimize {model} -o {out}/opt --limit 2 --time-budget 1",
    "bench": "bench {model} --limit 2 --runs 5 --csv {out}/b.csv",
    "compare": "compare {model} {other} --limit 2 --runs 5 -o {out}/cmp",
    "apply": "apply {model} {photo} -o {out}/made",
    "info": "info {model}",
}


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("small.pt", 0), ("other.pt", 1)):
        model = small_tinybeauty(seed=seed)
        save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), history=[HistoryStep.now("test")],
                                              preprocessing=Preprocessing(size=SIZE)), folder / name)
    Image.fromarray((np.random.default_rng(0).random((80, 72, 3)) * 255).astype(np.uint8)).save(folder / "face.png")
    return {"model": folder / "small.pt", "other": folder / "other.pt", "photo": folder / "face.png"}


def _ctrl_c_as_usual() -> None:
    """In the child, before Python starts: SIGINT does what it does in a terminal (a shell without job
    control starts background jobs, these tests among them, with SIGINT ignored, and Python keeps it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _args(name: str, inputs: dict, out: Path) -> list[str]:
    return COMMANDS[name].format(out=out, **inputs).split()


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
                                         p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


class Interrupted:
    """``python -m tinybeauty_cli`` with the default SIGINT handling, sent one SIGINT after ``seconds`` or once
    a stderr line matches ``trigger``; what it left behind."""

    def __init__(self, args: list[str], tmp_path: Path, *, seconds: float | None = None, trigger: str | None = None,
                 timeout: float = 600):
        scratch = tmp_path / "scratch"
        scratch.mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch), "NO_COLOR": "1", "COLUMNS": "200"}
        env.pop("TBOPT_DEBUG", None)
        proc = subprocess.Popen([sys.executable, "-m", "tinybeauty_cli", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ctrl_c_as_usual)
        self.lines: list[str] = []
        sent = threading.Event()

        def read() -> None:
            for line in proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if trigger is not None and not sent.is_set() and re.search(trigger, line):
                    proc.send_signal(signal.SIGINT)
                    sent.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if seconds is not None:
            time.sleep(seconds)
            self.finished_first = proc.poll() is not None
            if not self.finished_first:
                proc.send_signal(signal.SIGINT)
                sent.set()
        try:
            self.code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(10)
        if seconds is None:
            self.finished_first = not sent.is_set()
        self.scratch = _listing(scratch)

    def assert_clean(self, out: Path, inputs_before: dict, inputs_folder: Path, keeps_finished: bool = False) -> None:
        errors = [line for line in self.lines if line.startswith("Error:")]
        assert self.code == 130, (self.code, self.lines)
        assert errors == [INTERRUPTED], self.lines
        assert not any("Traceback" in line or "KeyboardInterrupt" in line or "internal error" in line
                       for line in self.lines), self.lines
        assert self.scratch == [], self.scratch
        left = _listing(out)
        if keeps_finished:  # tbopt run keeps the files of its finished stages, apply its finished images: whole
            assert not any(part.startswith(".") for p in left for part in Path(p).parts), left
        else:
            assert left == [], left  # no output, no hidden temporary folder
        assert _snapshot(inputs_folder) == inputs_before, "an input changed"


def _interrupt_and_check(name: str, inputs: dict, tmp_path: Path, **when) -> Interrupted | None:
    out = tmp_path / "out"
    folder = inputs["model"].parent
    before = _snapshot(folder)
    done = Interrupted(_args(name, inputs, out), tmp_path, **when)
    if done.finished_first:
        return None
    done.assert_clean(out, before, folder, keeps_finished=name in ("run", "apply"))
    return done


# ---------------------------------------------------------------- the moments of the issue


@pytest.mark.parametrize("trigger", [
    r"^drawing synthetic portraits: started",
    r"^timing engines: started",
    pytest.param(r"^graph rewrites .*: started", marks=pytest.mark.slow),
    pytest.param(r"^checking the float model .*: started", marks=pytest.mark.slow),
    pytest.param(r"^scoring float model: started", marks=pytest.mark.slow),
])
def test_quantize_interrupted_at_the_moments_of_the_issue(inputs, tmp_path, trigger):
    done = _interrupt_and_check("quantize", inputs, tmp_path, trigger=trigger)
    assert done is not None, "the command never reached the moment"


# ---------------------------------------------------------------- the net, in-process


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler for the test (a shell without job control starts jobs with it ignored)."""
    usual = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, usual)


def _drops_an_interrupt(then=None):
    """A library call that catches everything: the interrupt arrives inside it and is dropped."""
    def call(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except BaseException:  # noqa: BLE001 - what such a library does
            pass
        if then is not None:
            raise then
    return call


@pytest.mark.parametrize("then", [None, AttributeError("module 'torch._dynamo' has no attribute 'guards'")])
def test_an_interrupt_a_library_drops_still_ends_the_command(inputs, tmp_path, monkeypatch, python_ctrl_c, then):
    from tinybeauty_cli.flow import prune as flow_prune

    real = flow_prune.prune_module
    dropping = _drops_an_interrupt(then)

    def prune_module(*args, **kwargs):
        dropping()
        return real(*args, **kwargs)

    monkeypatch.setattr(flow_prune, "prune_module", prune_module)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["prune", str(inputs["model"]), "--rate", "0.3", "--limit", "1", "-o", str(out / "p.pt")])
    assert r.exit_code == 130, (r.exit_code, r.stderr)
    assert [line for line in r.stderr.splitlines() if line.startswith("Error")] == [INTERRUPTED], r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert _listing(out) == []


def test_the_next_command_in_the_process_is_not_taken_as_interrupted(inputs, python_ctrl_c):
    from tinybeauty_cli.core import interrupts

    with pytest.raises(KeyboardInterrupt):
        with interrupts.watched():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
    assert interrupts.received()
    r = CliRunner().invoke(app, ["info", str(inputs["model"])])
    assert r.exit_code == 0, r.stderr


def test_numpy_is_imported_before_torch_by_every_command():
    """torch's C extension imports numpy and drops an interrupt raised there: numpy must come first."""
    source = (ROOT / "tinybeauty_cli" / "cli" / "_imports.py").read_text()
    body = source[source.index("def numerics"):]
    assert body.index("import numpy") < body.index("import torch")
    for name in ("apply", "bench", "compare", "export", "info", "optimize", "prune", "quantize", "run"):
        text = (ROOT / "tinybeauty_cli" / "cli" / f"{name}.py").read_text()
        command = text[text.index(f"def {name}("):]
        first_import = command.index("    from ..")
        assert "_imports." in command[:first_import], f"tbopt {name} imports its work before cli._imports"


# ---------------------------------------------------------------- every command, every moment (slow)


def _moments(step: float = 0.5, start: float = 0.5, end: float = 600.0):
    t = start
    while t <= end:
        yield round(t, 2)
        t += step


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_every_moment_of_every_command(name, inputs, tmp_path):
    """SIGINT at 0.5 s, 1 s, 1.5 s, ... until the command finishes before the interrupt."""
    step = float(os.environ.get("TBOPT_INTERRUPT_STEP", "0.5"))
    tried = 0
    for k, t in enumerate(_moments(step)):
        where = tmp_path / f"at_{k:04d}"
        where.mkdir()
        done = _interrupt_and_check(name, inputs, where, seconds=t)
        if done is None:
            break
        tried += 1
    assert tried >= 2, f"tbopt {name} ended before its second interrupt"
