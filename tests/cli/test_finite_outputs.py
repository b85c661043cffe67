"""Issue 20, class 2: a model finite on the probe image but NaN on faces, through every command.

The checkpoint (``tests/models.py``) passes every check made when a model is opened. Wherever it
then runs on images -- scoring, calibration, validation, apply, the search -- the command must end
with one line naming the model and the image (its file, or "built-in test image N" / "synthetic
portrait N"), exit 1, write nothing, and never print "nan" as a figure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.errors import NonFiniteOutputError
from tinybeauty_cli.core.images import (builtin_test_set, load_folder, load_images, read_unlabeled,
                                        synthetic_unlabeled, uint8_to_model)
from tinybeauty_cli.core.sanity import require_finite_on, require_finite_output

from ..helpers import small_tinybeauty
from ..models import NAN_FIGURE, save_nan_on_faces

SIZE = 64
cli = CliRunner()
ENGINE = next(e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    save_nan_on_faces(root / "nan_on_faces.pt", SIZE)
    good = small_tinybeauty(seed=1)
    from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact

    save_artifact(Artifact.for_tinybeauty(good.config, good.state_dict(), preprocessing=Preprocessing(size=SIZE)),
                  root / "good.pt")
    photos = root / "photos"
    photos.mkdir()
    for i, face in enumerate(synthetic_unlabeled(2, 96, seed=3).inputs):
        Image.fromarray(face).save(photos / f"face_{i}.png")
    return root


@pytest.fixture
def run(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)

    def invoke(*args):
        return cli.invoke(app, [str(a).format(root=files, out=out) for a in args])

    invoke.out = out
    return invoke


def assert_names(result, model: str, image: str, out: Path) -> None:
    """Exit 1, one ``Error:`` line naming the model and the image (a hint at most), no figure, nothing written."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert len(lines) <= 2 and lines[0].startswith("Error: ") and all(x.startswith("Hint: ") for x in lines[1:]), lines
    assert model in lines[0] and image in lines[0] and "NaN or Inf" in lines[0], lines[0]
    assert "internal error" not in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert not NAN_FIGURE.search(result.stdout), result.stdout
    assert list(out.rglob("*")) == [], f"written: {list(out.rglob('*'))}"


#: command line, the image the message must name
CASES = {
    "bench": (["bench", "{root}/nan_on_faces.pt", "--no-timing", "--limit", "2"], "built-in test image 1"),
    "bench-photos": (["bench", "{root}/nan_on_faces.pt", "--no-timing", "--data", "{root}/photos"],
                     "photos/face_0.png"),
    "compare": (["compare", "{root}/nan_on_faces.pt", "{root}/good.pt", "--no-timing", "--limit", "2",
                 "-o", "{out}/cmp"], "built-in test image 1"),
    "prune": (["prune", "{root}/nan_on_faces.pt", "--rate", "0.3", "--limit", "2", "-o", "{out}/p.pt"],
              "built-in test image 1"),
    "prune-channel": (["prune", "{root}/nan_on_faces.pt", "--rate", "0.3", "--method", "channel", "--calib",
                       "{root}/photos", "--limit", "2", "-o", "{out}/p.pt"], "photos/face_0.png"),
    "quantize": (["quantize", "{root}/nan_on_faces.pt", "--calib-count", "2", "--limit", "2", "--backend", ENGINE,
                  "--keep-float", "none", "--threads", "1", "-o", "{out}/q.pt"], "synthetic portrait 1"),
    "quantize-calib": (["quantize", "{root}/nan_on_faces.pt", "--calib", "{root}/photos", "--calib-count", "2",
                        "--limit", "2", "--backend", ENGINE, "--threads", "1", "-o", "{out}/q.pt"],
                       "photos/face_0.png"),
    "export-fp32": (["export", "{root}/nan_on_faces.pt", "--fp32", "-o", "{out}/m.mlpackage"], "synthetic portrait 1"),
    "export-mlmodel": (["export", "{root}/nan_on_faces.pt", "-o", "{out}/m.mlmodel"], "synthetic portrait 1"),
    "apply": (["apply", "{root}/nan_on_faces.pt", "{root}/photos/face_1.png", "{root}/photos/face_0.png",
               "-o", "{out}/made"], "photos/face_1.png"),
    "run": (["run", "{root}/nan_on_faces.pt", "-o", "{out}/run", "--limit", "2", "--calib-count", "2",
             "--backend", ENGINE, "--runs", "1", "--threads", "1"], "built-in test image 1"),
    "optimize": (["optimize", "{root}/nan_on_faces.pt", "-o", "{out}/opt", "--limit", "2", "--time-budget", "1"],
                 "built-in test image 1"),
}


@pytest.mark.parametrize("name", CASES)
def test_nan_on_faces_is_one_line_naming_model_and_image(name, run):
    args, image = CASES[name]
    assert_names(run(*args), "nan_on_faces.pt", image, run.out)


def test_info_of_it_runs_on_no_face_and_prints_no_nan(run):
    r = run("info", "{root}/nan_on_faces.pt")
    assert r.exit_code == 0, r.stderr
    assert not NAN_FIGURE.search(r.stdout) and "internal error" not in r.stderr


def test_the_checkpoint_passes_the_checks_made_when_it_is_opened(files):
    from tinybeauty_cli.core.checkpoint import load_model

    loaded = load_model(files / "nan_on_faces.pt")  # finite weights, finite on the probe image: not refused
    assert loaded.problems == []
    with pytest.raises(NonFiniteOutputError):
        require_finite_on(loaded.path, loaded.module, torch.from_numpy(uint8_to_model(
            builtin_test_set(SIZE, limit=2).inputs)), builtin_test_set(SIZE, limit=2).image_labels())


# ---------------------------------------------------------------- the mechanism


def test_every_loader_names_its_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    assert load_folder(folder, 8).image_labels() == [str(folder / "a.png")]
    assert read_unlabeled(folder, 8)[0].image_labels() == [str(folder / "a.png")]
    pairs = tmp_path / "pairs"
    (pairs / "input").mkdir(parents=True)
    shutil.copytree(folder, pairs / "target", dirs_exist_ok=True)
    shutil.copy(folder / "a.png", pairs / "input" / "a.png")
    assert load_folder(pairs, 8).image_labels() == [str(pairs / "input" / "a.png")]
    assert load_images(None, 16, 2).image_labels() == ["built-in test image 1", "built-in test image 2"]
    assert builtin_test_set(16, 1).image_labels() == ["built-in test image 1"]
    assert synthetic_unlabeled(2, 16).image_labels() == ["synthetic portrait 1", "synthetic portrait 2"]


def test_the_check_names_the_first_bad_image_and_counts_them():
    outputs = np.zeros((4, 3, 2, 2), np.float32)
    outputs[2, 0, 0, 0] = np.nan
    outputs[3, 1, 1, 1] = np.inf
    with pytest.raises(NonFiniteOutputError) as caught:
        require_finite_output("m.pt", outputs, ["a.png", "b.png", "c.png", "d.png"])
    assert str(caught.value) == "m.pt computes NaN or Inf on c.png (2 of 4 images); its weights cannot be right"
    assert (caught.value.model, caught.value.image) == ("m.pt", "c.png")
    require_finite_output("m.pt", np.zeros((2, 3, 2, 2)), ["a", "b"])  # finite: nothing raised


def test_a_batch_is_named_by_its_place_in_the_set():
    class Nan(torch.nn.Module):
        def forward(self, x):
            return torch.where(x[:, :1].mean((1, 2, 3), keepdim=True) > 0.5, x * np.nan, x)

    x = torch.zeros(12, 3, 4, 4)
    x[9] = 1.0
    with pytest.raises(NonFiniteOutputError, match=r"on image_9;"):
        require_finite_on("net", Nan(), x, [f"image_{i}" for i in range(12)], batch=8)


def test_validation_names_the_written_file_when_only_it_computes_nan():
    """A file whose weights became NaN/Inf on the way (fp16 overflow): validation refuses it, naming it."""
    from tinybeauty_cli.core.artifact import Preprocessing
    from tinybeauty_cli.export.validate import fidelity

    good = small_tinybeauty(seed=2).eval()
    broken = small_tinybeauty(seed=2).eval()
    with torch.no_grad():
        broken.out.conv.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match=r"^the exported m\.mlmodel computes NaN or Inf on synthetic "
                                                   r"portrait 1 \(2 of 2 images\)"):
        fidelity(good, broken, 32, Preprocessing(size=32), labels=("good.pt", "the exported m.mlmodel"))
