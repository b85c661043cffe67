"""``tbopt export`` -> the reference executor: every kind of file the exporter writes runs and matches.

Its files are checked the same way tests/coreml/test_reference_executor.py checks coremltools' own conversions
(fp32 >= 90 dB, fp16 >= 60 dB against the PyTorch model; compressed >= 60 dB against the
PyTorch model carrying the file's decompressed weights).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.quality import fidelity_psnr_db
from tinybeauty_cli.coreml import runner as cr
from tinybeauty_cli.coreml.spec import coremltools
from tinybeauty_cli.measure.describe import describe

from tests.helpers import COREML_SIZE as SIZE, small_tinybeauty, run_ok
from tests.coreml_helpers import with_file_weights


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small TinyBeauty and a half-pruned copy of it, as tbopt artifacts at SIZE px."""
    folder = tmp_path_factory.mktemp("export_cross")
    dense = small_tinybeauty(seed=7, dim=8, n_res=1)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    paths = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        paths[name] = folder / f"{name}.pt"
        save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(),
                                              preprocessing=Preprocessing(size=SIZE)), paths[name])
    return folder, {"dense": dense, "pruned": pruned}, paths


slow = pytest.mark.slow
CASES = [  # (file name, export options, source model, bar kind)
    pytest.param("fp32-tensor.mlpackage", ["--fp32", "--io", "tensor"], "dense", "fp32", id="fp32-tensor.mlpackage"),
    pytest.param("fp16-image.mlpackage", ["--fp16"], "dense", "fp16", id="fp16-image.mlpackage"),
    pytest.param("int8-image.mlpackage", ["--weights", "int8"], "dense", "compressed", marks=slow, id="int8-image.mlpackage"),
    pytest.param("pal4-tensor.mlpackage", ["--weights", "pal4", "--io", "tensor"], "dense", "compressed", id="pal4-tensor.mlpackage"),
    pytest.param("sparse-pal4.mlpackage", ["--weights", "pal4"], "pruned", "compressed", id="sparse-pal4.mlpackage"),
    pytest.param("fp32-tensor.mlmodel", ["--fp32", "--io", "tensor"], "dense", "fp32", marks=slow, id="fp32-tensor.mlmodel"),
    pytest.param("fp16-image.mlmodel", ["--fp16"], "dense", "fp16", marks=slow, id="fp16-image.mlmodel"),
    pytest.param("pal2-image.mlmodel", ["--weights", "pal2"], "dense", "compressed", id="pal2-image.mlmodel"),
]


@pytest.mark.parametrize("name,options,source,bar", CASES)
def test_exported_files_run_in_the_reference_executor(models, inputs, name, options, source, bar):
    folder, modules, paths = models
    path = folder / name
    export_json(paths[source], path, *options)
    runner = cr.open_coreml_runner(path, use_device=False, round_image_output=False)
    reference = modules[source]
    if bar == "compressed":
        reference = with_file_weights(copy.deepcopy(reference), path, SIZE)
    with torch.inference_mode():
        want = np.clip(inputs + np.concatenate([reference(torch.from_numpy(inputs[i:i + 1])).numpy()
                                                for i in range(len(inputs))]), -1, 1)
    db = fidelity_psnr_db(runner.predict(inputs), want)
    assert db >= {"fp32": 90.0, "fp16": 60.0, "compressed": 60.0}[bar], f"{name}: {db:.1f} dB"


# --- fp16 image files: the made-up image in fp32; metadata; fp16 inputs -------------------------------------


def export_json(source, path, *options) -> dict:
    """``tbopt export SOURCE -o PATH --json`` (replacing PATH): what it printed."""
    return json.loads(run_ok("export", source, "-o", path, "--json", "-q", "--force", *options).stdout)


_EXPORTED: dict[tuple, object] = {}


def exported(models, name: str, *options) -> object:
    """``tbopt export`` of the dense model to ``name`` with ``options``, once per session."""
    folder, _, paths = models
    key = (str(folder), name, options)
    if key not in _EXPORTED:
        export_json(paths["dense"], folder / name, *options)
        _EXPORTED[key] = folder / name
    return _EXPORTED[key]


def tail_steps(runner: cr.CoreMLRunner) -> list:
    """The executor's steps after the network's last tanh (TinyBeauty's output layer)."""
    steps = runner.backend.executor.graph.steps
    last = max(k for k, s in enumerate(steps) if s.kind == "tanh")
    return steps[last + 1:]


def test_fp16_image_files_make_up_the_face_in_fp32(models, inputs):
    """``x + r``, the clip, ``+ 1`` and ``* 127.5`` run in fp32 in an fp16 program: the image file
    gives what its tensor twin's fp16 residual gives, made up in fp32 (fp16 hardware emulated)."""
    image, tensor = (exported(models, "image.mlpackage", "--fp16"),
                     exported(models, "tensor.mlpackage", "--fp16", "--io", "tensor"))
    made = cr.open_coreml_runner(image, use_device=False, fp16_emulation=True, round_image_output=False)
    twin = cr.open_coreml_runner(tensor, use_device=False, fp16_emulation=True)
    tail = tail_steps(made)
    assert {s.kind for s in tail} >= {"add", "clip", "mul"} and not any(s.rounded for s in tail)
    assert all(s.rounded for s in made.backend.executor.graph.steps if s.kind == "conv")  # the network is fp16
    assert fidelity_psnr_db(made.predict(inputs), twin.predict(inputs)) >= 100.0
    meta = made.model.spec.description.metadata
    assert "fp16 compute, image post-processing in fp32" in meta.shortDescription
    precision = made.info()["precision"]  # tbopt info names the ops kept in fp32
    assert precision.startswith("fp16; in fp32: ") and "clip x1" in precision, precision


@pytest.mark.realdata
def test_fp16_image_file_of_the_released_model_on_a_real_face(tmp_path, real_inputs):
    """>= 88 dB against the fp32 network before 8-bit rounding (fp16 hardware emulated)."""
    from tinybeauty_cli.core.checkpoint import load_model

    from tests.helpers import REAL_CKPT, REAL_COREML_SIZE

    path = export_json(REAL_CKPT, tmp_path / "real.mlpackage", "--fp16", "--size", REAL_COREML_SIZE)["path"]
    made = cr.open_coreml_runner(path, use_device=False, fp16_emulation=True, round_image_output=False)
    model = load_model(REAL_CKPT).module.eval()
    with torch.inference_mode():
        want = np.clip(real_inputs + model(torch.from_numpy(real_inputs)).numpy(), -1, 1)
    assert fidelity_psnr_db(made.predict(real_inputs[:1]), want[:1]) >= 88.0


def rewrite_metadata(path, out, **entries) -> None:
    """A copy of a Core ML file with some userDefined metadata replaced (as an earlier tbopt wrote it)."""
    ct = coremltools()
    ml = ct.models.MLModel(str(path), skip_model_load=True)
    spec = ml.get_spec()
    for k, v in entries.items():
        spec.description.metadata.userDefined[k] = v
    ct.models.MLModel(spec, weights_dir=getattr(ml, "weights_dir", None), skip_model_load=True).save(str(out))


@pytest.mark.parametrize("suffix", [".mlpackage", pytest.param(".mlmodel", marks=slow)])
def test_metadata_says_what_the_file_gives(models, inputs, tmp_path, suffix):
    image, tensor = (exported(models, f"image{suffix}", "--fp16"),
                     exported(models, f"tensor{suffix}", "--fp16", "--io", "tensor"))
    for path, output in ((image, "image"), (tensor, "residual")):
        runner = cr.open_coreml_runner(path, use_device=False)
        meta = runner.model.spec.description.metadata
        prep = json.loads(meta.userDefined["tbopt.preprocessing"])
        assert prep["output"] == output and prep["size"] == SIZE
        assert prep.get("network_output") == ("residual" if output == "image" else None)
        # a NeuralNetwork's compute precision is the device's choice: the file claims none
        assert ("compute" in meta.shortDescription) == (suffix == ".mlpackage"), meta.shortDescription
        assert "fp16 weights" in meta.shortDescription
    # a file from an earlier tbopt: image I/O labelled "residual"; it still runs as the made-up image
    old = tmp_path / f"old{suffix}"
    rewrite_metadata(image, old, **{"tbopt.preprocessing": json.dumps({"size": SIZE, "value_range": [-1, 1],
                                                                       "output": "residual"})})
    new_runner, old_runner = (cr.open_coreml_runner(p, use_device=False) for p in (image, old))
    assert old_runner.preprocessing.output == new_runner.preprocessing.output == "image"
    assert np.array_equal(old_runner.residual(inputs), new_runner.residual(inputs))
    assert describe(old)["coreml_output"].endswith("the made-up image")
    photo = tmp_path / "face.png"
    Image.fromarray(((inputs[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)).save(photo)
    for path in (image, old):
        run_ok("apply", path, photo, "-o", tmp_path / path.stem, "-q")
    a, b = (np.asarray(Image.open(tmp_path / p.stem / "face.png")) for p in (image, old))
    assert np.array_equal(a, b)


def test_declared_fp16_inputs_are_rounded_in_every_mode(models, inputs):
    """An fp16 tensor input holds fp16 values, whatever array the caller hands Core ML."""
    path = exported(models, "fp16-in.mlpackage", "--fp16", "--io", "tensor", "--target", "iOS16")
    x = np.clip(inputs[:1] + np.float32(3e-4) * np.random.default_rng(0).standard_normal(inputs[:1].shape,
                                                                                         np.float32), -1, 1)
    x16 = x.astype(np.float16).astype(np.float32)
    assert not np.array_equal(x, x16)
    for emulation in (False, True):
        runner = cr.open_coreml_runner(path, use_device=False, fp16_emulation=emulation)
        assert runner.model.input.dtype == "fp16"
        assert np.array_equal(runner.backend.run(x), runner.backend.run(x16))
