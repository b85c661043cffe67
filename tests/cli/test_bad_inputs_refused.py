"""A corpus of bad and odd inputs through every command, each refused in one line with nothing changed.

1. weights that cannot be right: NaN/Inf in a tensor, finite weights that compute Inf/NaN;
2. files that are models, but not of one 3-channel image in and one out (TorchScript, Core ML);
3. inputs are read-only: every case runs on a corpus made read-only, and checks that no byte,
   no modification time and no file of it changed, and that nothing is left in the output
   folder after a refusal, nor in the temporary folder after any run; a few cases run as an
   unprivileged user on read-only files (root ignores permissions);
4. images: every mode, size and format Pillow reads works; unreadable files get one line.

The corpus is built once for the module, small (TinyBeauty width 8 at 32x32). Each case asserts
the exit code, one ``Error:`` line (and at most a ``Hint:``) without a traceback when refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact

from tests.helpers import ENGINE, MODEL_COMMANDS, ROOT, cheap_command_args, run, small_tinybeauty

SIZE = 32


# ---------------------------------------------------------------- the corpus

def _artifact(path: Path, model: nn.Module, size: int = SIZE) -> None:
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), preprocessing=Preprocessing(size=size)),
                  path)


def _traced(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module.eval(), example), str(path))


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def _broken(model: nn.Module, how: str) -> nn.Module:
    with torch.no_grad():
        if how == "nan":
            model.out.conv.weight[0, 0, 0, 0] = float("nan")
        elif how == "inf":
            next(p for n, p in model.named_parameters() if n.endswith("bias")).fill_(float("inf"))
        elif how == "overflow":  # finite weights whose activations overflow float32
            for p in model.parameters():
                p.mul_(1e30)
    return model


def _coreml(path: Path, module: nn.Module, example: torch.Tensor, *, program: bool = True) -> None:
    from tinybeauty_cli.coreml.spec import coremltools

    ct = coremltools()
    import logging
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        traced = torch.jit.trace(module.eval(), example)
        kwargs = {"minimum_deployment_target": ct.target.iOS16} if program else {}
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=example.shape)],
                        convert_to="mlprogram" if program else "neuralnetwork", **kwargs)
    ml.save(str(path))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's first bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Readable images of every mode, size and format; name -> expected (width, height) upright."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "RGB")
    grey16 = Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16))
    made = {
        "rgb.png": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "la.png": rgb.convert("LA"),
        "l.png": rgb.convert("L"),
        "p.png": rgb.convert("P"),
        "p_transparent.gif": rgb.convert("P"),
        "bilevel.png": rgb.convert("1"),
        "grey16.png": grey16,
        "int32.tif": Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 1000).astype(np.int32), "I"),
        "float.tif": Image.fromarray(np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(40, 48), "F"),
        "float_nan.tif": Image.fromarray(np.where(np.arange(48 * 40).reshape(40, 48) % 7 == 0, np.nan, 0.5)
                                         .astype(np.float32), "F"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "ycbcr.jpg": rgb,
        "lab.tif": rgb.convert("LAB"),
        "tiny_1x1.png": Image.new("RGB", (1, 1), (200, 120, 90)),
        "wide_3000x40.png": Image.new("RGB", (3000, 40), (90, 120, 200)),
        "tall_40x3000.jpg": Image.new("RGB", (40, 3000), (90, 200, 120)),
        "pic.bmp": rgb,
        "pic.webp": rgb,
        "pic.ppm": rgb,
        "pic.tga": rgb,
        "photo_png_named.jpg": rgb,  # a PNG with a .jpg name
    }
    sizes = {}
    for name, im in made.items():
        kwargs: dict = {}
        if name == "p_transparent.gif":
            kwargs["transparency"] = 0
        fmt = "PNG" if name == "photo_png_named.jpg" else None
        im.save(folder / name, format=fmt, **kwargs)
        sizes[name] = im.size
    # EXIF orientation 6: stored 48x40, shown rotated (40x48)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    sizes["exif_rotated.jpg"] = (40, 48)
    # an animated GIF: its first frame is used
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sizes["animated.gif"] = rgb.size
    return sizes


def _bad_images(folder: Path, good_png: bytes, good_jpg: bytes) -> list[str]:
    folder.mkdir()
    files = {
        "text.png": b"this is not an image\n",
        "empty.png": b"",
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": good_jpg[: len(good_jpg) // 3],
        "random.jpg": np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8).tobytes(),
        "bomb.png": _png_claiming(40000, 40000),
        "html.webp": b"<html><body>not found</body></html>",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return list(files)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    _artifact(root / "good.pt", small_tinybeauty(seed=1))
    # 1. weights that cannot be right
    torch.save(_broken(small_tinybeauty(seed=2), "nan").state_dict(), root / "nan_weight.pt")
    _artifact(root / "inf_bias.pt", _broken(small_tinybeauty(seed=3), "inf"))
    _artifact(root / "overflow.pt", _broken(small_tinybeauty(seed=4), "overflow"))
    _traced(root / "nan_torchscript.pt", _broken(small_tinybeauty(seed=5), "nan"), x)
    _coreml(root / "inf.mlpackage", _broken(small_tinybeauty(seed=6), "inf"), x)  # the converter compares NaN to itself
    # 2. models that are not one image in and one out
    _traced(root / "linear.pt", nn.Linear(10, 4), torch.rand(1, 10))
    _traced(root / "grey_in.pt", nn.Conv2d(1, 3, 3, padding=1), torch.rand(1, 1, SIZE, SIZE))
    _traced(root / "classifier.pt", nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                  nn.Linear(4, 10)), x)
    _traced(root / "halves.pt", nn.Conv2d(3, 3, 3, stride=2, padding=1), x)
    torch.jit.save(torch.jit.script(_Pair()), str(root / "pair.pt"))
    _coreml(root / "linear.mlpackage", nn.Linear(10, 4), torch.rand(1, 10))
    _coreml(root / "classifier.mlmodel", nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            x, program=False)
    _coreml(root / "grey_in.mlpackage", nn.Conv2d(1, 3, 3, padding=1), torch.rand(1, 1, SIZE, SIZE))
    # 3. good Core ML files, and packages that cannot be read
    _coreml(root / "good.mlpackage", small_tinybeauty(seed=1), x)
    _coreml(root / "good.mlmodel", small_tinybeauty(seed=1), x, program=False)
    shutil.copytree(root / "good.mlpackage", root / "bad_manifest.mlpackage")
    (root / "bad_manifest.mlpackage" / "Manifest.json").write_text("{ not json")
    shutil.copytree(root / "good.mlpackage", root / "no_graph.mlpackage")
    (root / "no_graph.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel").unlink()
    # 4. images
    sizes = _odd_images(root / "odd")
    buf_png, buf_jpg = io.BytesIO(), io.BytesIO()
    Image.open(root / "odd" / "rgb.png").save(buf_png, "PNG")
    Image.open(root / "odd" / "rgb.png").save(buf_jpg, "JPEG")
    bad = _bad_images(root / "bad", buf_png.getvalue(), buf_jpg.getvalue())
    (root / "bad" / "folder.png").mkdir()
    mixed = root / "mixed"
    mixed.mkdir()
    shutil.copy(root / "odd" / "rgb.png", mixed / "a_good.png")
    shutil.copy(root / "odd" / "cmyk.jpg", mixed / "b_good.jpg")
    shutil.copy(root / "bad" / "text.png", mixed / "c_text.png")
    pairs = root / "pairs"
    (pairs / "input").mkdir(parents=True)
    (pairs / "target").mkdir()
    shutil.copy(root / "odd" / "rgba.png", pairs / "input" / "one.png")
    shutil.copy(root / "odd" / "cmyk.jpg", pairs / "target" / "one.jpg")
    shutil.copy(root / "odd" / "grey16.png", pairs / "input" / "two.png")
    shutil.copy(root / "odd" / "exif_rotated.jpg", pairs / "target" / "two.jpg")
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    yield {"root": root, "sizes": sizes, "bad": bad}
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: its kind, bytes' hash, mode and modification time (ns)."""
    snap = {}
    for p in sorted([root, *root.rglob("*")]):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        snap[str(p.relative_to(root))] = (p.is_dir(), digest, st.st_mode, st.st_mtime_ns)
    return snap


@pytest.fixture
def case(corpus, tmp_path, monkeypatch):
    """Runs one command; checks the corpus is untouched and no temporary file is left."""
    out = tmp_path / "out"
    out.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(out)
    before = _snapshot(corpus["root"])

    class Case:
        root = corpus["root"]
        sizes = corpus["sizes"]

        def __init__(self):
            self.out = out

        def run(self, *args):
            return run(*args)

    yield Case()
    assert _snapshot(corpus["root"]) == before, "an input changed"
    # torch keeps its compiler cache there (created once per process, not an output of tbopt), and
    # coremltools removes the temporary packages of the models it converts when the process exits
    # (atexit), which this one does not do between cases
    left = [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")
            and not (p.name.startswith("tmp") and p.suffix == ".mlpackage")]
    assert left == [], f"left in the temporary folder: {left}"


def assert_refused(result, *words, code=1):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert all(line.startswith("Hint: ") for line in lines[1:]), result.stderr
    assert len(lines) <= 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert list(out.rglob("*")) == [], f"left in the output folder: {list(out.rglob('*'))}"


def _flag(command: str, *names: str) -> str:
    """The first of ``names`` that ``command`` takes (option names may be unified across commands)."""
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    taken = {o for p in cmd.params for o in getattr(p, "opts", [])}
    return next(n for n in names if n in taken)


def command_args(command: str, model: Path, root: Path, out: Path) -> list:
    """Arguments of ``command`` on ``model`` (the cheapest options), its outputs under ``out``."""
    return cheap_command_args(command, model, root / "odd" / "rgb.png", root / "good.pt", out)


COMMANDS = MODEL_COMMANDS

# ---------------------------------------------------------------- 1. weights that cannot be right

BROKEN = ("nan_weight.pt", "inf_bias.pt", "overflow.pt", "nan_torchscript.pt", "inf.mlpackage")
CORE_ML_TAKERS = ("info", "apply", "bench", "compare")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model", BROKEN)
def test_weights_that_cannot_be_right(case, model, command):
    r = case.run(*command_args(command, case.root / model, case.root, case.out))
    if model.endswith(".mlpackage") and command not in CORE_ML_TAKERS:
        assert_refused(r, "Core ML model")  # these commands take PyTorch models
    elif command == "info":  # info describes the file, and says it cannot be used
        assert r.exit_code == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(warnings) == 1 and warnings[0].startswith("Warning: ") and "NaN or Inf" in warnings[0]
        assert "usable" in r.stdout and "NO:" in r.stdout
    else:
        assert_refused(r, "NaN or Inf")
    if command != "info":
        assert_nothing_written(case.out)


def test_info_json_lists_the_problem(case):
    import json

    r = case.run("info", case.root / "nan_weight.pt", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert len(d["problems"]) == 1 and "out.conv.weight" in d["problems"][0]


# ---------------------------------------------------------------- 2. models, but not of this kind

NOT_IMAGE_MODELS = ("linear.pt", "grey_in.pt", "classifier.pt", "halves.pt", "pair.pt",
                    "linear.mlpackage", "classifier.mlmodel", "grey_in.mlpackage")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model", NOT_IMAGE_MODELS)
def test_models_of_another_kind(case, model, command):
    r = case.run(*command_args(command, case.root / model, case.root, case.out))
    if model.endswith((".mlpackage", ".mlmodel")) and command not in CORE_ML_TAKERS:
        assert_refused(r, "Core ML model", "PyTorch")
    else:
        assert_refused(r, str(case.root / model))
        line = r.stderr.splitlines()[0]
        assert "3-channel" in line or "image" in line, line
    assert_nothing_written(case.out)


@pytest.mark.parametrize("command", ("prune", "quantize", "export", "run"))
def test_a_good_core_ml_model_is_not_a_pytorch_model(case, command):
    r = case.run(*command_args(command, case.root / "good.mlpackage", case.root, case.out))
    assert_refused(r, "Core ML")
    assert_nothing_written(case.out)


# ---------------------------------------------------------------- 3. inputs are read-only

GOOD = ("good.pt", "good.mlpackage", "good.mlmodel")


@pytest.mark.parametrize("command", CORE_ML_TAKERS)
@pytest.mark.parametrize("model", GOOD)
def test_reading_a_good_model_changes_nothing(case, model, command):
    r = case.run(*command_args(command, case.root / model, case.root, case.out))
    assert r.exit_code == 0, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", CORE_ML_TAKERS)
@pytest.mark.parametrize("model", ("bad_manifest.mlpackage", "no_graph.mlpackage"))
def test_a_package_that_cannot_be_read_is_left_as_it_was(case, model, command):
    r = case.run(*command_args(command, case.root / model, case.root, case.out))
    assert_refused(r, str(case.root / model))
    assert_nothing_written(case.out)


@pytest.mark.parametrize("command", ("prune", pytest.param("quantize", marks=pytest.mark.slow)))
def test_writing_commands_leave_a_read_only_checkpoint_alone(case, command):
    r = case.run(*command_args(command, case.root / "good.pt", case.root, case.out))
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in case.out.iterdir()] == [Path(command_args(command, case.root / "good.pt", case.root,
                                                                           case.out)[-2]).name]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", (".mlpackage", ".mlmodel"))
def test_export_leaves_a_read_only_checkpoint_alone(case, suffix):
    r = case.run("export", case.root / "good.pt", "-o", case.out / f"m{suffix}", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in case.out.iterdir()] == [f"m{suffix}"]


def _without_privileges(scratch: Path) -> list[str] | None:
    """A command prefix under which permissions hold (root without its capabilities), or None.

    Root writes through ``a-w``; with its capability bounding set dropped (``setpriv``) it cannot,
    so a write into a read-only input is an error there, not a silent change.
    """
    if shutil.which("setpriv") is None:
        return None
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    probe = scratch / "read_only_probe"
    probe.write_text("x")
    probe.chmod(0o444)
    try:
        r = subprocess.run([*prefix, "sh", "-c", f"echo y > '{probe}'"], capture_output=True)
    finally:
        probe.chmod(0o644)
        probe.unlink()
    return prefix if r.returncode != 0 else None


@pytest.mark.parametrize("command", ("info", pytest.param("apply", marks=pytest.mark.slow),
                                     pytest.param("bench", marks=pytest.mark.slow)))
def test_read_only_package_without_privileges(corpus, tmp_path, command):
    """The read-only corpus, opened by a process that cannot write it: a write would fail the command."""
    prefix = _without_privileges(tmp_path)
    if prefix is None:
        pytest.skip("cannot run a process that permissions bind here (needs setpriv, or not root)")
    root = corpus["root"]
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(root)
    args = {"info": ["info", root / "good.mlpackage"],
            "apply": ["apply", root / "good.mlpackage", root / "odd" / "rgb.png", "-o", out / "made"],
            "bench": ["bench", root / "good.mlpackage", root / "good.pt", "--no-timing", "--limit", "2",
                      "--quiet"]}[command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(out), "NO_COLOR": "1"}
    r = subprocess.run([*prefix, sys.executable, "-m", "tinybeauty_cli", *map(str, args)], cwd=out, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(root) == before
    left = sorted(p.name for p in out.iterdir())
    assert left == (["made"] if command == "apply" else []), left


# ---------------------------------------------------------------- 4. images

ODD = ("rgb.png", "rgba.png", "la.png", "l.png", "p.png", "p_transparent.gif", "bilevel.png", "grey16.png",
       "int32.tif", "float.tif", "float_nan.tif", "cmyk.jpg", "ycbcr.jpg", "lab.tif", "tiny_1x1.png",
       "wide_3000x40.png", "tall_40x3000.jpg", "pic.bmp", "pic.webp", "pic.ppm", "pic.tga", "photo_png_named.jpg",
       "exif_rotated.jpg", "animated.gif")


@pytest.mark.parametrize("name", ODD)
def test_every_image_pillow_reads_is_made_up(case, name):
    r = case.run("apply", case.root / "good.pt", case.root / "odd" / name, "-o", case.out / "made", "--quiet")
    assert r.exit_code == 0, r.stderr
    made = case.out / "made" / f"{Path(name).stem}.png"
    assert sorted(p.name for p in (case.out / "made").iterdir()) == [made.name]
    with Image.open(made) as im:
        assert im.mode == "RGB" and im.size == case.sizes[name]


BAD = ("text.png", "empty.png", "truncated.png", "truncated.jpg", "random.jpg", "bomb.png", "html.webp",
       "folder.png")


@pytest.mark.parametrize("name", BAD)
def test_an_unreadable_image_is_one_line_and_nothing_is_written(case, name):
    good = case.root / "odd" / "rgb.png"
    r = case.run("apply", case.root / "good.pt", good, case.root / "bad" / name, "-o", case.out / "made")
    assert_refused(r, name)
    assert_nothing_written(case.out)  # every photo is read before any is written


def test_every_odd_image_in_one_folder_is_scored(case):
    r = case.run("bench", case.root / "good.pt", case.root / "good.mlpackage", "--data", case.root / "odd",
                 "--no-timing", "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    import json

    rows = json.loads(r.stdout)["rows"]
    assert all(row["images"] == len(ODD) for row in rows), rows


def test_pairs_of_odd_formats_are_scored(case):
    r = case.run("compare", case.root / "good.pt", case.root / "good.mlmodel", "--data", case.root / "pairs",
                 "--no-timing", "-o", case.out / "cmp", "--quiet")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("folder", ("mixed", "bad"))
@pytest.mark.parametrize("command", ("bench", "compare", "prune", "run"))
def test_scored_folder_stops_at_an_unreadable_image(case, command, folder):
    good = case.root / "good.pt"
    data = case.root / folder
    args = {"bench": ["bench", good, "--no-timing", "--data", data],
            "compare": ["compare", good, case.root / "good.mlpackage", "--no-timing", "--data", data,
                        "-o", case.out / "cmp"],
            "prune": ["prune", good, "--rate", "0.3", "--eval-data", data, "-o", case.out / "p.pt"],
            "run": ["run", good, _flag("run", "--output", "--out"), case.out / "run", "--data", data]}[command]
    r = case.run(*args)
    assert_refused(r, "c_text.png" if folder == "mixed" else str(data))
    assert_nothing_written(case.out)


@pytest.mark.slow
def test_calibration_skips_an_unreadable_image(case):
    r = case.run("quantize", case.root / "good.pt", "--calib", case.root / "mixed", "--calib-count", "3",
                 "--limit", "2", "--keep-float", "none", "--backend", ENGINE, "-o", case.out / "int8.pt")
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable" in r.stderr and "c_text.png" in r.stderr
    assert [p.name for p in case.out.iterdir()] == ["int8.pt"]


def test_calibration_without_a_readable_image_is_refused(case):
    r = case.run("quantize", case.root / "good.pt", "--calib", case.root / "bad", "--limit", "2",
                 "-o", case.out / "int8.pt")
    assert_refused(r, "no readable images")
    assert_nothing_written(case.out)


def test_fine_tuning_skips_an_unreadable_image(case):
    r = case.run("prune", case.root / "good.pt", "--rate", "0.3", "--finetune-steps", "1",
                 _flag("prune", "--calib", "--data"), case.root / "mixed", "--limit", "2", "-o", case.out / "p.pt")
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable" in r.stderr and "c_text.png" in r.stderr
    assert [p.name for p in case.out.iterdir()] == ["p.pt"]


def test_fine_tuning_without_a_readable_image_is_refused(case):
    r = case.run("prune", case.root / "good.pt", "--rate", "0.3", "--finetune-steps", "1",
                 _flag("prune", "--calib", "--data"), case.root / "bad", "--limit", "2", "-o", case.out / "p.pt")
    assert_refused(r, "no readable images")
    assert_nothing_written(case.out)
