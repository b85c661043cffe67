"""The macOS path: Core ML itself computes (``coreml.runner.DeviceBackend``).

Every test runs twice. ``stand-in`` (any OS): coremltools' ``MLModel`` is replaced by
:class:`StandInMLModel` -- the real class, loaded without compiling, whose ``predict`` runs
tbopt's reference executor behind Core ML's calling conventions (a PIL RGB image or an array
of the declared dtype in, the same out) -- and ``coreml_available`` says yes, so
``CoreMLRunner`` takes its on-device path. ``core ml`` runs the same test against Core ML
itself and is skipped off macOS. A few tests (failures) need the stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinybeauty_cli.core.errors import InputError
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.coreml import runner as cr
from tinybeauty_cli.coreml.spec import coremltools, read_coreml
from tinybeauty_cli.runtime.runners import open_runner

from tests.coreml_helpers import StandInMLModel
from tests.helpers import assert_one_line_error, run

ON_MAC = cr.coreml_available()
#: Files of every declared interface: fp16 arrays (iOS 16), fp32 arrays, RGB images; both formats.
FILES = ["mlprogram/tensor/fp16", "mlprogram/image/fp16", "mlprogram/tensor/fp32", "neuralnetwork/image/fp32",
         "neuralnetwork/tensor/fp16"]

ct = coremltools()
@pytest.fixture(params=["stand-in", pytest.param("core ml", marks=pytest.mark.skipif(
    not ON_MAC, reason="Core ML itself runs on macOS only"))])
def device(request, monkeypatch) -> str:
    """``stand-in``: Core ML patched in (any OS); ``core ml``: Core ML itself (macOS)."""
    if request.param == "stand-in":
        StandInMLModel.loads.clear()
        StandInMLModel.fail_load = StandInMLModel.fail_predict = None
        monkeypatch.setattr(cr, "coreml_available", lambda: True)
        monkeypatch.setattr(ct.models, "MLModel", StandInMLModel)
    return request.param


@pytest.fixture
def stand_in(monkeypatch) -> type[StandInMLModel]:
    """The stand-in only (failures cannot be provoked in Core ML itself)."""
    StandInMLModel.loads.clear()
    StandInMLModel.fail_load = StandInMLModel.fail_predict = None
    monkeypatch.setattr(cr, "coreml_available", lambda: True)
    monkeypatch.setattr(ct.models, "MLModel", StandInMLModel)
    return StandInMLModel


@pytest.mark.parametrize("name", FILES)
def test_predictions_move_through_core_ml_as_the_model_declares(tb_zoo, inputs, device, name):
    path = tb_zoo.path(name)
    runner = open_runner(path, compute_units="cpu")
    assert isinstance(runner.backend, cr.DeviceBackend) and runner.on_device
    assert runner.engine == "Core ML on device (cpu)"
    assert runner.backend.mlmodel.compute_unit == ct.ComputeUnit.CPU_ONLY
    got = runner.predict(inputs)
    want = cr.open_coreml_runner(path, use_device=False).predict(inputs)
    assert got.shape == want.shape == inputs.shape
    model = read_coreml(path)
    if device == "stand-in":
        feed = StandInMLModel.loads[-1].feeds[-1][model.input.name]
        if model.input.kind == "tensor":  # an array of the declared type and shape
            assert feed.dtype == (np.float16 if model.input.dtype == "fp16" else np.float32)
            assert feed.shape == model.input.shape
        # the same arithmetic: a declared-fp16 input is rounded by the reference executor too
        assert np.array_equal(got, want)
    else:  # pragma: no cover - macOS: Core ML's own kernels, fp16 on the CPU for fp16 programs
        tol = 2.0 / 127.5 if model.output.kind == "image" else 2e-2
        assert np.abs(got - want).max() <= tol


def test_compute_units_reach_coremltools(tb_zoo, device):
    path = tb_zoo.path("mlprogram/tensor/fp16")
    assert open_runner(path).backend.mlmodel.compute_unit == ct.ComputeUnit.ALL  # Core ML's default
    for units in cr.ComputeUnits:
        runner = open_runner(path, compute_units=units.value)
        assert runner.backend.compute_units is units
        assert runner.backend.mlmodel.compute_unit == units.coreml()
        assert runner.engine == f"Core ML on device ({units.value})"
    runner = open_runner(path, fp16_emulation=True)
    assert any("reference executor" in n for n in runner.notes)
    assert isinstance(open_runner(path, use_device=False).backend, cr.ReferenceBackend)
    info = runner.info()  # the graph is listed (read by the reference executor) though Core ML runs it
    assert "coreml_ops" in info and info["precision"] == "fp16"


def test_commands_on_core_ml(tb_zoo, tmp_path, device):
    photo = tmp_path / "face.png"
    Image.fromarray(builtin_test_set(64, limit=1).inputs[0]).save(photo)
    r = run("apply", tb_zoo.path("mlprogram/image/fp16"), photo, "-o", tmp_path / "o", "--compute-units", "cpu-gpu",
            "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["engine"] == "Core ML on device (cpu-gpu)"
    assert np.asarray(Image.open(tmp_path / "o" / "face.png")).shape == (64, 64, 3)
    r = run("bench", tb_zoo.path("mlprogram/tensor/fp16"), "--compute-units", "cpu", "--limit", "2", "--runs", "2",
            "--warmup", "1", "--json")
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["engine"] == "Core ML on device (cpu)"
    if device == "stand-in":
        assert [m.compute_unit for m in StandInMLModel.loads[-2:]] == [ct.ComputeUnit.CPU_AND_GPU,
                                                                       ct.ComputeUnit.CPU_ONLY]


def test_core_ml_failures_are_one_line_errors(tb_zoo, inputs, tmp_path, stand_in):
    path = tb_zoo.path("mlprogram/image/fp16")
    runner = open_runner(path, compute_units="cpu-ne")  # opening runs the file once (a probe): it works
    stand_in.fail_predict = "Error computing NN outputs.\n  more of Core ML's own words"
    with pytest.raises(InputError, match=r"Core ML prediction failed on .*\(cpu-ne\): Error computing NN outputs\.$"):
        runner.residual(inputs[:1])
    assert_one_line_error(run("bench", path, "--limit", "2", "--no-timing"), "Core ML prediction failed")
    stand_in.fail_predict = None
    stand_in.fail_load = "compiler error: the model cannot run on this device\nsecond line"
    with pytest.raises(InputError, match=r"Core ML cannot load .* \(all\): compiler error: .*device$"):
        open_runner(path)
    assert_one_line_error(run("info", path), "Core ML cannot load")


def test_core_ml_is_refused_where_it_cannot_run(tb_zoo):
    if ON_MAC:  # pragma: no cover - only on a Mac
        pytest.skip("Core ML is available here")
    from tinybeauty_cli.core.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="needs macOS"):
        cr.open_coreml_runner(tb_zoo.path("mlprogram/tensor/fp16"), use_device=True)
    runner = open_runner(tb_zoo.path("mlprogram/tensor/fp16"), compute_units="cpu-gpu")
    assert isinstance(runner.backend, cr.ReferenceBackend)
    assert any("--compute-units cpu-gpu has no effect" in n for n in runner.notes)

