"""Every name the file system accepts can be written, by every command that writes: a legal 248-byte name
works (the hidden temporary name stays short); what cannot be written -- a name longer than 255 bytes, a
path under a file, a folder that is not writable -- is refused before any work, in one line, with nothing
made; ``ghost/../out`` is written as ``out`` and leaves no ``ghost/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tinybeauty_cli.core.images import builtin_test_set

from ..helpers import assert_one_line_error, save_small

SIZE = 32
LONG = 248  # bytes: legal (<= 255), but a temporary name made by adding to it was not
runner = CliRunner()


def cli(*args):
    from tinybeauty_cli.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    ckpt = save_small(d / "m.pt", size=SIZE)
    face = d / "face.png"
    Image.fromarray(builtin_test_set(SIZE, 1).inputs[0]).save(face)
    return ckpt, face


FAST = ["--limit", "2", "--threads", "1"]


# Each command that writes: (is the output a folder, its suffix, the command line for an output, what it writes)
COMMANDS = {
    "prune": (False, ".pt", lambda c, f, o: ["prune", c, "-o", o, "--rate", "0.3", "--method", "magnitude", "--finetune-steps", "0",
                                            *FAST], lambda o: o),
    "quantize": (False, ".pt", lambda c, f, o: ["quantize", c, "-o", o, "--backend", "x86", "--calib-count", "2",
                                                *FAST], lambda o: o),
    "export-mlmodel": (False, ".mlmodel", lambda c, f, o: ["export", c, "-o", o], lambda o: o),
    "export-mlpackage": (False, ".mlpackage", lambda c, f, o: ["export", c, "-o", o], lambda o: o),
    "bench-csv": (False, ".csv", lambda c, f, o: ["bench", c, "--csv", o, "--no-timing", *FAST], lambda o: o),
    "apply": (True, "", lambda c, f, o: ["apply", c, f, "-o", o], lambda o: o / "face.png"),
    "compare": (True, "", lambda c, f, o: ["compare", c, c, "-o", o, "--no-timing", *FAST],
                lambda o: o / "m_vs_m.png"),
    "run": (True, "", lambda c, f, o: ["run", c, "-o", o, "--calib-count", "2", "--backend", "x86", "--runs", "2",
                                       *FAST], lambda o: o / "TinyBeauty.mlmodel"),
    "optimize": (True, "", lambda c, f, o: ["optimize", c, "--out", o, "--for", "ios13", "--rates", "",
                                            "--palettes", "pal8", "--sparsities", "", "--fit-steps", "0",
                                            "--no-bits-by-layer", "--min-fidelity", "10", *FAST],
                 lambda o: o / "TinyBeauty.mlmodel"),
}
SLOW = {"run", "optimize"}


def _params(case: str):
    return [pytest.param(name, id=f"{name}-{case}", marks=[pytest.mark.slow] if name in SLOW and case in
                         ("long-name", "ghost") else []) for name in COMMANDS]


def _name(bytes_: int, suffix: str) -> str:
    return "n" * (bytes_ - len(suffix)) + suffix


def _left(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in where.rglob("*"))


@pytest.mark.parametrize("command", _params("long-name"))
def test_a_legal_248_byte_name_is_written(inputs, tmp_path, command):
    folder, suffix, args, written = COMMANDS[command]
    out = tmp_path / _name(LONG, suffix)
    r = cli(*args(*inputs, out))
    assert r.exit_code == 0, r.output
    assert written(out).exists()
    assert not [p for p in _left(tmp_path) if ".tmp" in p]  # no temporary leftovers


@pytest.mark.parametrize("command", _params("too-long"))
def test_a_name_longer_than_255_bytes_is_refused_before_any_work(inputs, tmp_path, command):
    folder, suffix, args, _ = COMMANDS[command]
    out = tmp_path / "new" / _name(256, suffix)
    r = cli(*args(*inputs, out))
    assert_one_line_error(r, "longer than the 255 bytes")
    assert _left(tmp_path) == []


@pytest.mark.parametrize("command", _params("under-a-file"))
def test_a_path_under_a_file_is_refused_before_any_work(inputs, tmp_path, command):
    folder, suffix, args, _ = COMMANDS[command]
    (tmp_path / "afile").write_text("x")
    r = cli(*args(*inputs, tmp_path / "afile" / "sub" / f"out{suffix}"))
    assert_one_line_error(r, "afile")
    assert _left(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("command", _params("unwritable"))
def test_an_unwritable_folder_is_refused_before_any_work(inputs, tmp_path, command):
    if os.geteuid() == 0:
        pytest.skip("root writes into any folder: permissions cannot make one unwritable")
    folder, suffix, args, _ = COMMANDS[command]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = cli(*args(*inputs, locked / "new" / f"out{suffix}"))
        assert_one_line_error(r, "not writable")
        assert _left(locked) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", _params("ghost"))
def test_a_path_through_a_missing_folder_is_normalized(inputs, tmp_path, command, monkeypatch):
    folder, suffix, args, written = COMMANDS[command]
    monkeypatch.chdir(tmp_path)
    r = cli(*args(*inputs, Path("ghost") / ".." / f"g{suffix}"))
    assert r.exit_code == 0, r.output
    assert written(tmp_path / f"g{suffix}").exists()
    assert not (tmp_path / "ghost").exists()
