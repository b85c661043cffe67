"""What the tests share: where things are, small models and photos made on the spot, the CLI run
in-process, the look of an error, exporting at test size, and rebuilding a file by its recorded
command. The fixtures built from these are in ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.artifact import Artifact, HistoryStep, Preprocessing, save_artifact
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig

#: The project's root folder (pyproject.toml, README.md, tinybeauty_cli/).
ROOT = Path(__file__).resolve().parent.parent
# A git worktree sits one level deeper than the main checkout: TBOPT_REALDATA points there.
REALDATA = Path(os.environ.get("TBOPT_REALDATA") or ROOT.parent / "shared" / "realdata")
REAL_CKPT = REALDATA / "tinybeauty_style1.pt"
REAL_FACE = REALDATA / "face_01.png"

COREML_SIZE = 32  # small and fast; the full-size figures are in benchmarks/coreml_runtime_figures.py
REAL_COREML_SIZE = 64  # the released network is resolution-agnostic
ARTIFACT_SIZE = 64  # save_small's files run at 64x64: the code paths are those of 256, the tests 16x faster
EXPORT_SIZE = 32  # every export() is 32x32: the graphs are the same, the checks 64x cheaper


# ---------------------------------------------------------------- models and photos

def small_tinybeauty(seed: int = 0, dim: int = 8, n_res: int = 1) -> TinyBeauty:
    torch.manual_seed(seed)
    model = TinyBeauty(TinyBeautyConfig.uniform(dim, n_res)).eval()
    with torch.no_grad():  # small residuals, like a trained model's
        model.out.conv.weight.mul_(0.1)
    return model


def save_small(path: Path, model: TinyBeauty | None = None, history=("test-fixture",),
               size: int = ARTIFACT_SIZE) -> Path:
    """``model`` (by default ``small_tinybeauty()``) saved as a tbopt artifact at ``path``."""
    model = model or small_tinybeauty()
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(),
                                          history=[HistoryStep.now(h) for h in history],
                                          preprocessing=Preprocessing(size=size)), path)
    return path


#: ``tbopt quantize`` options for a small model: fast, one thread.
QUANTIZE_FAST = ("--backend", "x86", "--calib-count", "3", "--limit", "3", "--threads", "1")


def save_small_and_int8(folder: Path) -> tuple[Path, Path, dict]:
    """A small float model in ``folder`` and its int8 file by ``tbopt quantize`` (with ``QUANTIZE_FAST``),
    and quantize's JSON result."""
    src = save_small(folder / "small.pt")
    out = folder / "small_int8.pt"
    r = run("quantize", src, "-o", out, "--json", *QUANTIZE_FAST)
    assert r.exit_code == 0, r.stderr
    return src, out, json.loads(r.stdout)


def save_photo(path: Path, size: tuple[int, int] = (96, 64), seed: int = 0) -> Path:
    """A random RGB photo of ``size`` (width, height) saved at ``path``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def photo_folder(folder: Path, count: int, side: int) -> Path:
    """``count`` random square photos ``p0.png``... in ``folder`` (made)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


# ---------------------------------------------------------------- the CLI in-process

runner = CliRunner()


def run(*args, **kw):
    """``tbopt ARGS`` through Typer's CliRunner (stdout and stderr apart)."""
    return runner.invoke(app, [str(a) for a in args], **kw)


def run_ok(*args, **kw):
    """:func:`run` that asserts the command succeeded."""
    r = run(*args, **kw)
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    return r


#: A progress line, as commands print them when stderr is not a terminal (cli/_output.PlainTask), or
#: tbopt run's stage line ("[1/5] pruning ...").
PROGRESS_LINE = re.compile(r"^([^:]+: (started\b|done in \d|\d+/\d+ \(|elapsed \d)|\[\d/\d\] )")


def assert_one_line_error(result, match=None, code=1):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip() and not PROGRESS_LINE.match(l)]
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert len([l for l in lines if not l.startswith("Hint: ")]) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if match:
        assert match in lines[0], lines[0]


# ---------------------------------------------------------------- export, and the same file again

def export(src, out, force: bool = False, size: int = EXPORT_SIZE, **kw):
    """``flow.export.export_file`` at test size; ``kw`` are ``ExportConfig.for_output`` options."""
    from tinybeauty_cli.export.config import ExportConfig
    from tinybeauty_cli.flow.export import export_file

    return export_file(src, out, ExportConfig.for_output(out, size=size, **kw), force=force)


#: Keys of measured times in metadata: they are measurements, not results.
TIMED = ("time", "seconds", "latency", "_ms", "_s", "timings", "measured_on")


def untimed(obj):
    """``obj`` without the measured times and timestamps."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not any(t == k or k.endswith(t) for t in TIMED)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def core_ml_parts(path: Path) -> tuple[bytes, dict, dict[str, bytes]]:
    """(the graph without its metadata, the metadata, every other file's bytes) of a Core ML file."""
    from tinybeauty_cli.coreml.spec import load_spec

    spec = load_spec(path)
    meta = dict(spec.description.metadata.userDefined)
    spec.description.metadata.userDefined.clear()
    files = {}
    if path.is_dir():
        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                 if p.is_file() and p.suffix not in (".mlmodel", ".json")}
    return spec.SerializeToString(deterministic=True), meta, files


def export_and_rebuild_by_its_command(tmp_path: Path, args: list[str], name: str) -> tuple[Path, dict]:
    """``tbopt export *args -o name --json`` in one folder, then the command the file records in another;
    asserts both files have the same graph, weight files and metadata (the history untimed). Returns the
    first file and its JSON."""
    here = os.getcwd()
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    try:
        os.chdir(first)
        made = json.loads(run_ok("export", *args, "-o", name, "--json").stdout)
        assert made["command"].startswith("tbopt export ")
        os.chdir(second)
        run_ok(*shlex.split(made["command"])[1:], "--quiet")
    finally:
        os.chdir(here)
    ga, ma, fa = core_ml_parts(first / name)
    gb, mb, fb = core_ml_parts(second / name)
    assert ga == gb and fa == fb  # the ops, their bits and the weight file
    history = "tbopt.history"
    assert {k: v for k, v in ma.items() if k != history} == {k: v for k, v in mb.items() if k != history}
    assert untimed(json.loads(ma[history])) == untimed(json.loads(mb[history]))
    return first / name, made


# ---------------------------------------------------------------- every command on one model, cheaply

#: The int8 engine the command tests quantize with: the first this PyTorch build has.
ENGINE = next(e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines)
#: The commands that take one model file.
MODEL_COMMANDS = ("info", "apply", "bench", "compare", "prune", "quantize", "export", "run")


def cheap_command_args(command: str, model: Path, photo: Path, other_model: Path, out: Path) -> list:
    """``command`` on ``model`` with the cheapest options (``photo`` for apply, ``other_model`` for
    compare), its outputs under ``out``."""
    return {
        "info": ["info", model],
        "apply": ["apply", model, photo, "-o", out / "made"],
        "bench": ["bench", model, "--no-timing", "--limit", "2", "--quiet"],
        "compare": ["compare", model, other_model, "--no-timing", "--limit", "2", "-o", out / "cmp", "--quiet"],
        "prune": ["prune", model, "--rate", "0.3", "--limit", "2", "-o", out / "pruned.pt", "--quiet"],
        "quantize": ["quantize", model, "--limit", "2", "--calib-count", "2", "--keep-float", "none",
                     "--backend", ENGINE, "-o", out / "int8.pt", "--quiet"],
        "export": ["export", model, "-o", out / "model.mlpackage", "--quiet"],
        "run": ["run", model, "--output", out / "run", "--limit", "2", "--quiet"],
    }[command]


def small_space(**kw):
    """A small ``tbopt optimize`` space: ios16 only, no pruning, three palettes, no sparse, GPTQ or
    fitted storage; int8 fast (``kw`` replaces any of it)."""
    from tinybeauty_cli.flow.optimize_config import OptimizeConfig

    base = dict(targets=("ios16",), rates=(), palettes=("pal8", "pal4", "pal2"), sparsities=(), fit_steps=0,
                bits_by_layer=False, gptq=False, calib_count=3, backend="x86", runs=2, warmup=0, threads=1)
    return OptimizeConfig(**{**base, **kw})


def rebuild_by_commands(commands, dest: Path, cwd: Path, monkeypatch) -> Path:
    """Run the printed ``tbopt`` commands (a search's recipe) in ``cwd``, the final output renamed into ``cwd``."""
    monkeypatch.chdir(cwd)
    for line in commands:
        args = shlex.split(line)
        assert args[0] == "tbopt"
        if args[-2:] == ["-o", str(dest)]:
            args[-1] = dest.name
        r = run(*args[1:])
        assert r.exit_code == 0, (line, r.output)
    return cwd / dest.name
