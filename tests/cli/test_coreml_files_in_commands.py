"""Core ML files through the commands: apply, info, bench, compare -- on Linux, and with Core ML patched in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.coreml import runner as cr

from tests.helpers import REAL_FACE, assert_one_line_error, run
from tests.coreml_helpers import save_mil_program


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "face.png"
    Image.fromarray(builtin_test_set(96, limit=1).inputs[0]).save(path)
    return path


@pytest.fixture(scope="module")
def tb_checkpoint(tb_zoo, tmp_path_factory):
    """The PyTorch model the zoo's Core ML files were converted from, as a tbopt artifact."""
    path = tmp_path_factory.mktemp("ckpt") / "tb.pt"
    model = tb_zoo.model
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(),
                                          preprocessing=Preprocessing(size=tb_zoo.size)), path)
    return path


@pytest.mark.parametrize("name", ["mlprogram/image/fp16", "neuralnetwork/tensor/fp16"])
def test_apply_a_core_ml_model_on_linux(tb_zoo, photo, tmp_path, name):
    out = tmp_path / "out"
    r = run("apply", tb_zoo.path(name), photo, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["engine"].startswith("Core ML reference executor (not device)")
    made = np.asarray(Image.open(out / "face.png"))
    assert made.shape == (96, 96, 3)
    assert 0 < data["images"][0]["mean_abs_change"] < 60
    r = run("apply", tb_zoo.path(name), photo, "-o", out)  # never overwrite without --force
    assert_one_line_error(r, "already exists")


def test_apply_table_names_the_engine(tb_zoo, photo, tmp_path):
    r = run("apply", tb_zoo.path("mlprogram/tensor/fp16"), photo, "-o", tmp_path / "o", "--fp16-emulation")
    assert r.exit_code == 0, r.stderr
    assert "Core ML reference executor (not device)" in r.stdout and "fp16 rounding" in r.stdout


def test_compute_units_off_macos_is_a_warning(tb_zoo, photo, tmp_path):
    r = run("apply", tb_zoo.path("mlprogram/tensor/fp16"), photo, "-o", tmp_path / "o", "--compute-units", "cpu-ne")
    assert r.exit_code == 0, r.stderr
    assert "Warning: --compute-units cpu-ne has no effect" in r.stderr


def test_bad_compute_units_is_a_usage_error(tb_zoo, photo, tmp_path):
    r = run("apply", tb_zoo.path("mlprogram/tensor/fp16"), photo, "-o", tmp_path / "o", "--compute-units", "gpu")
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_core_ml_options_on_a_checkpoint_are_ignored_with_a_warning(small_artifact, photo, tmp_path):
    r = run("apply", small_artifact, photo, "-o", tmp_path / "o", "--compute-units", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "--compute-units only affect Core ML models" in r.stderr


def test_info_on_core_ml_files(tb_zoo):
    r = run("info", tb_zoo.path("mlprogram/tensor/pal4"))
    assert r.exit_code == 0, r.stderr
    for text in ("ML Program (.mlpackage)", "iOS16", "constexpr_lut_to_dense x10", "coreml_ops", "conv 10"):
        assert text in r.stdout
    r = run("info", tb_zoo.path("neuralnetwork/image/int8"), "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kind"] == "coreml" and data["format"] == "NeuralNetwork (.mlmodel)"
    assert data["coreml_weights"].startswith("8-bit linear")
    assert data["preprocessing"]["output"] == "image" and data["size_bytes"] > 0


def test_bench_and_compare_take_core_ml_files(tb_zoo, tb_checkpoint, tmp_path):
    mlp, nn = tb_zoo.path("mlprogram/tensor/fp16"), tb_zoo.path("neuralnetwork/tensor/fp32")
    r = run("bench", tb_checkpoint, mlp, nn, "--limit", "2", "--runs", "2", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    rows = {row["name"]: row for row in data["rows"]}
    assert rows[mlp.name]["engine"].startswith(cr.REFERENCE_ENGINE)
    assert rows[mlp.name]["fidelity_psnr_db"] >= 60 and rows[nn.name]["fidelity_psnr_db"] >= 90
    assert rows[mlp.name]["latency_p50_ms"] > 0
    assert any("not device latency" in n for n in data["notes"])
    r = run("compare", tb_checkpoint, mlp, "--limit", "2", "--no-timing", "-o", tmp_path / "cmp", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["psnr_between_mean_db"] >= 60 and "not device" in data["b"]["engine"]
    assert (tmp_path / "cmp").is_dir()


def test_unknown_op_is_one_line(tmp_path, photo):
    path = save_mil_program(tmp_path, lambda mb, x: mb.cumsum(x=x, axis=1))
    r = run("apply", path, photo, "-o", tmp_path / "o")
    assert_one_line_error(r, "cumsum")
    assert not (tmp_path / "o").exists()


def test_bad_core_ml_files_are_one_line(tmp_path, photo):
    junk = tmp_path / "junk.mlmodel"
    junk.write_bytes(b"\x00garbage" * 50)
    assert_one_line_error(run("apply", junk, photo, "-o", tmp_path / "o"), "cannot read Core ML model")
    assert_one_line_error(run("info", tmp_path / "nope.mlpackage"), "does not exist")


@pytest.mark.realdata
def test_apply_the_released_model_as_core_ml(real_zoo, tmp_path):
    if not REAL_FACE.is_file():
        pytest.skip("../shared/realdata is absent")
    r = run("apply", real_zoo.path("mlprogram/image/fp16"), REAL_FACE, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    made = np.asarray(Image.open(tmp_path / "out" / "face_01.png"))
    face = np.asarray(Image.open(REAL_FACE).convert("RGB"))
    assert made.shape == face.shape
    change = np.abs(made.astype(int) - face.astype(int)).mean()
    assert 0.5 < change < 30  # the makeup is visible but the face is the face
