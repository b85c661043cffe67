"""Output places and interrupts.

Output places: an output path under a file, in a folder that cannot be written (or made), on a full disk
-> one ``Error:`` line, exit 1, and nothing partial or temporary left anywhere (the target folder
as it was, no hidden temporary folder, nothing in the temporary folder). The full disk is a small
tmpfs where the machine allows mounting one (root), and in every case a writer that fails with
ENOSPC in-process.

Interrupts: Ctrl-C (SIGINT) sent to ``python -m tinybeauty_cli`` at several moments -- the start-up
imports, after a step's progress line (fine-tuning, calibration, export, measurement) -- exits 130
with one line, and leaves no partial or temporary file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, assert_one_line_error, run, small_tinybeauty

def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The process's temporary folder, watched: every command must leave it empty."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    assert listing(folder) == []


@pytest.fixture
def inputs(tmp_path, small_artifact):
    """The small model, a second one, and a photo, in their own folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    model = folder / "small.pt"
    shutil.copy(small_artifact, model)
    other = folder / "other.pt"
    import torch

    torch.save(small_tinybeauty(seed=1).state_dict(), other)
    photo = folder / "face.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)).save(photo)
    return {"model": model, "other": other, "photo": photo}


#: Every command that writes, with ``{out}`` where its output goes (a file or a folder).
WRITERS = {
    "prune": "prune {model} --rate 0.3 --limit 1 -o {out}/p.pt",
    "quantize": "quantize {model} --backend x86 --calib-count 2 --limit 1 --keep-float none --threads 1 -o {out}/q.pt",
    "export-mlmodel": "export {model} -o {out}/m.mlmodel",
    "export-mlpackage": "export {model} -o {out}/m.mlpackage",
    "apply": "apply {model} {photo} -o {out}/made",
    "compare": "compare {model} {other} --limit 1 --no-timing -o {out}/cmp",
    "bench-csv": "bench {model} --limit 1 --no-timing --csv {out}/b.csv",
    "run": "run {model} -o {out}/run --limit 1 --calib-count 2 --backend x86 --runs 1 --threads 1",
}


def _args(name: str, inputs: dict, out: Path) -> list[str]:
    return WRITERS[name].format(out=out, **inputs).split()


@pytest.mark.parametrize("name", WRITERS)
def test_an_output_under_a_file_is_one_line(name, inputs, tmp_path, scratch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    before = listing(tmp_path)
    assert_one_line_error(run(*_args(name, inputs, a_file / "sub")), "is a file, not a folder", 1)
    assert listing(tmp_path) == before


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written into, not even by root: a read-only tmpfs (or, not as root, mode 0555)."""
    folder = tmp_path / "ro"
    if _is_root():
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a folder root cannot write")
        _mount_tmpfs(folder, "size=64k,ro")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("name", WRITERS)
def test_an_unwritable_folder_is_one_line(name, inputs, read_only_folder, scratch):
    # the output's folder is missing and cannot be made there: the same refusal, before any work
    for out in (read_only_folder, read_only_folder / "missing" / "deeper"):
        assert_one_line_error(run(*_args(name, inputs, out)), "not writable", 1)
        assert listing(read_only_folder) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KB tmpfs filled to the last byte (root only; skipped elsewhere with the reason)."""
    if not _is_root():
        pytest.skip("mounting a small tmpfs for a full disk needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    folder = tmp_path / "full"
    _mount_tmpfs(folder, "size=64k")
    try:
        with open(folder / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_is_one_line_and_leaves_nothing(name, inputs, full_disk, scratch):
    before = listing(full_disk)
    assert_one_line_error(run(*_args(name, inputs, full_disk)), "no space left", 1)
    assert listing(full_disk) == before  # no partial output, no hidden temporary folder


@pytest.mark.parametrize("name", ["export-mlmodel", "export-mlpackage", "prune"])
def test_missing_folders_are_made_and_nothing_temporary_is_left(name, inputs, tmp_path, scratch):
    out = tmp_path / "new" / "deeper"
    r = run(*_args(name, inputs, out))
    assert r.exit_code == 0, r.stderr
    made = listing(tmp_path / "new")
    assert made and not any(part.startswith(".") for p in made for part in Path(p).parts), made
    # coremltools' temporary packages went to the command's private temporary folder, now removed
    # (the scratch fixture checks that the process's temporary folder is empty)


def _fail_after_writing_part(monkeypatch, target, attr: str, folder: bool = False, path_is_self: bool = False) -> None:
    """Make a writer put part of its output down, then fail as a full disk does (``path_is_self``: the
    writer is a method of the path, as ``Path.write_bytes``)."""
    def writer(self_or_obj, *args, **kwargs):
        path = self_or_obj if path_is_self else args[0]
        # a path, or an open file (whose .name is its path); a Path's own .name is only its last part
        path = Path(path) if isinstance(path, (str, os.PathLike)) else Path(path.name)
        if folder:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "part"
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(target, attr, writer)


def test_enospc_from_each_writer_in_process(inputs, tmp_path, scratch, monkeypatch):
    """Without a mount: each kind of writer fails with ENOSPC halfway; nothing partial is left."""
    from PIL import Image as PILImage

    from tinybeauty_cli.coreml.spec import coremltools

    mlmodel = coremltools().models.MLModel
    out = tmp_path / "out"
    out.mkdir()
    # the writers each command's file goes through: an artifact's bytes (core.written.write_file),
    # coremltools' MLModel.save, Pillow's Image.save
    cases = [("prune", Path, "write_bytes", False, True), ("export-mlmodel", mlmodel, "save", False, False),
             ("export-mlpackage", mlmodel, "save", True, False), ("apply", PILImage.Image, "save", False, False)]
    for name, target, attr, folder, path_is_self in cases:
        with monkeypatch.context() as m:
            _fail_after_writing_part(m, target, attr, folder, path_is_self)
            assert_one_line_error(run(*_args(name, inputs, out)), "no space left", 1)
        assert listing(out) == [], (name, listing(out))


# ------------------------------------------------------------------------------------------ interrupts


def _ctrl_c_as_usual() -> None:
    """In the child, before Python starts: SIGINT does what it does in a terminal. A shell without job
    control starts background jobs (and so these tests, and their children) with SIGINT ignored, and
    Python keeps an ignored SIGINT ignored: the child would never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(args: list[str], trigger: str, tmp_path: Path, python_flags: tuple[str, ...] = (),
               timeout: float = 300) -> tuple[int, list[str]]:
    """Run ``python -m tinybeauty_cli ARGS``, send SIGINT once a stderr line matches ``trigger``.

    Returns the exit code and the stderr lines (``-X importtime`` lines left out).
    """
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    (tmp_path / "before.txt").write_text("\n".join(listing(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch), "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("TBOPT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, *python_flags, "-m", "tinybeauty_cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_usual)
    lines: list[str] = []
    sent = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            line = line.rstrip("\n")
            if not sent.is_set() and re.search(trigger, line):
                proc.send_signal(signal.SIGINT)
                sent.set()
            if not line.startswith("import time:"):
                lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    assert sent.is_set(), f"never saw {trigger!r}: {lines}"
    return code, lines


def assert_interrupted(code: int, lines: list[str], tmp_path: Path, expected: set[str]) -> None:
    errors = [line for line in lines if line.startswith("Error:")]
    assert code == 130, (code, lines)
    assert errors == ["Error: interrupted; no partial or temporary file was left behind"], lines
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), lines
    assert listing(tmp_path / "scratch") == [], listing(tmp_path / "scratch")
    before = set((tmp_path / "before.txt").read_text().splitlines()) | {"before.txt"}
    left = set(listing(tmp_path)) - before
    assert left == expected, left  # no partial output, no hidden temporary folder


def _cli(name: str, inputs: dict, tmp_path: Path, extra: str = "") -> list[str]:
    return (WRITERS[name] + extra).format(out=tmp_path / "out", **inputs).split()


def test_interrupt_during_start_up_imports(inputs, tmp_path):
    # -X importtime prints a line as each module finishes importing: typer's means the CLI is importing
    code, lines = _interrupt(["info", str(inputs["model"])], r"import time:.*\|\s+typer$", tmp_path,
                             python_flags=("-X", "importtime"))
    assert_interrupted(code, lines, tmp_path, set())


@pytest.mark.slow
def test_interrupt_during_the_torch_import(inputs, tmp_path):
    code, lines = _interrupt(["info", str(inputs["model"])], r"import time:.*\|\s+torch\.nn\.modules", tmp_path,
                             python_flags=("-X", "importtime"))
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_prune_during_fine_tuning(inputs, tmp_path):
    args = _cli("prune", inputs, tmp_path, " --finetune-steps 1000000")
    code, lines = _interrupt(args, r"^fine-tuning \(distillation\): started", tmp_path)
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_quantize_during_calibration(inputs, tmp_path):
    calib = tmp_path / "in" / "calib"
    calib.mkdir()
    for i in range(128):  # small files: quick to read, each calibrated at the model's 256 px
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(calib / f"c{i:03d}.png")
    args = _cli("quantize", inputs, tmp_path, f" --calib {calib}").copy()
    args[args.index("--calib-count") + 1] = "128"
    code, lines = _interrupt(args, r"^calibrating \(x86\): started", tmp_path)
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_export_during_conversion(inputs, tmp_path):
    code, lines = _interrupt(_cli("export-mlpackage", inputs, tmp_path), r"^exporting m\.mlpackage: started",
                             tmp_path)
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_bench_during_measurement(inputs, tmp_path):
    args = ["bench", str(inputs["model"]), "--limit", "1", "--runs", "100000000", "--csv", str(tmp_path / "out/b.csv")]
    code, lines = _interrupt(args, r"^timing small\.pt: started", tmp_path)
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_compare_during_scoring_or_timing(inputs, tmp_path):
    args = ["compare", str(inputs["model"]), str(inputs["other"]), "--limit", "1", "--runs", "100000000",
            "-o", str(tmp_path / "out/cmp")]
    code, lines = _interrupt(args, r"^timing small\.pt: started", tmp_path)
    assert_interrupted(code, lines, tmp_path, set())


def test_interrupt_run_during_its_first_stage(inputs, tmp_path):
    args = _cli("run", inputs, tmp_path, " --method channel --finetune-steps 1000000")
    code, lines = _interrupt(args, r"^fine-tuning \(distillation\): started", tmp_path)
    assert_interrupted(code, lines, tmp_path, set())  # the folder made for the run is removed too


def test_interrupt_apply_while_writing(tmp_path, inputs):
    big = tmp_path / "in" / "big"
    big.mkdir()
    photos = []
    for i in range(4):  # large photos: each takes a while to make up and to write
        p = big / f"p{i}.png"
        Image.fromarray((np.random.default_rng(i).random((1500, 1500, 3)) * 255).astype(np.uint8)).save(p)
        photos.append(str(p))
    args = ["apply", str(inputs["model"]), *photos, "-o", str(tmp_path / "out")]
    code, lines = _interrupt(args, r"^applying: started", tmp_path)
    assert code == 130
    made = {p for p in listing(tmp_path) if p == "out" or p.startswith("out/")}
    # finished images are whole and kept; nothing partial or hidden
    assert all(re.fullmatch(r"out(/p\d\.png)?", p) for p in made), made
    for p in made - {"out"}:
        assert Image.open(tmp_path / p).size == (1500, 1500)
    assert_interrupted(code, lines, tmp_path, made)


@pytest.mark.slow
@pytest.mark.parametrize("stage, trigger", [("export", r"^\[3/5\]"),
                                            ("measure", r"^scoring TinyBeauty\.mlmodel: started")])
def test_interrupt_run_in_later_stages_keeps_earlier_files_whole(inputs, tmp_path, stage, trigger):
    args = _cli("run", inputs, tmp_path).copy()
    args[args.index("--limit") + 1] = "20"  # the Core ML files are scored in the measure stage: a while
    code, lines = _interrupt(args, trigger, tmp_path)
    kept = {p for p in listing(tmp_path) if p == "out" or p.startswith("out/")}
    assert "out/run/tinybeauty_pruned.pt" in kept and "out/run/tinybeauty_optimized.pt" in kept
    assert not any("/." in p for p in kept), kept  # no hidden temporary folder
    assert_interrupted(code, lines, tmp_path, kept)


def test_interrupt_during_the_swap_is_held_until_it_is_done(tmp_path):
    """An interrupt that arrives while an output is renamed into place lands after the rename."""
    from tinybeauty_cli.core.files import atomic_output

    target = tmp_path / "pkg.mlpackage"
    target.mkdir()
    (target / "old").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two renames of a folder
            time.sleep(0.05)
        return real_replace(a, b)

    # Python's own Ctrl-C handler, whatever this process was started with (a shell without job control
    # starts background jobs with SIGINT ignored, and an ignored interrupt is rightly not raised).
    usual = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(os, "replace", replace)
                with atomic_output(target, force=True, directory=True) as tmp:
                    tmp.mkdir()
                    (tmp / "new").write_text("new")
    finally:
        signal.signal(signal.SIGINT, usual)
    assert len(calls) == 2 and sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg.mlpackage"]
