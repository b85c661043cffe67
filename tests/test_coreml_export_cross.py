"""``tbopt export`` -> the reference executor: every kind of file the exporter writes runs and matches.

Its files are checked the same way test_coreml_runtime.py checks coremltools' own conversions
(fp32 >= 90 dB, fp16 >= 60 dB against the PyTorch model; compressed >= 60 dB against the
PyTorch model carrying the file's decompressed weights).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.quality import fidelity_psnr_db
from tinybeauty_cli.coreml import runner as cr

from .conftest import COREML_SIZE as SIZE
from .conftest import small_tinybeauty
from .coreml_helpers import with_file_weights

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
    pytest.param("fp16-image.mlpackage", [], "dense", "fp16", id="fp16-image.mlpackage"),
    pytest.param("int8-image.mlpackage", ["--weights", "int8"], "dense", "compressed", marks=slow, id="int8-image.mlpackage"),
    pytest.param("pal4-tensor.mlpackage", ["--weights", "pal4", "--io", "tensor"], "dense", "compressed", id="pal4-tensor.mlpackage"),
    pytest.param("sparse-pal4.mlpackage", ["--weights", "pal4"], "pruned", "compressed", id="sparse-pal4.mlpackage"),
    pytest.param("fp32-tensor.mlmodel", ["--fp32", "--io", "tensor"], "dense", "fp32", marks=slow, id="fp32-tensor.mlmodel"),
    pytest.param("fp16-image.mlmodel", [], "dense", "fp16", marks=slow, id="fp16-image.mlmodel"),
    pytest.param("pal2-image.mlmodel", ["--weights", "pal2"], "dense", "compressed", id="pal2-image.mlmodel"),
]


@pytest.mark.parametrize("name,options,source,bar", CASES)
def test_exported_files_run_in_the_reference_executor(models, inputs, name, options, source, bar):
    folder, modules, paths = models
    path = folder / name
    r = CliRunner().invoke(app, ["export", str(paths[source]), "-o", str(path), "--json", "-q", *options])
    assert r.exit_code == 0, r.stderr
    json.loads(r.stdout)
    runner = cr.open_coreml_runner(path, use_device=False, round_image_output=False)
    reference = modules[source]
    if bar == "compressed":
        reference = with_file_weights(copy.deepcopy(reference), path, SIZE)
    with torch.inference_mode():
        want = np.clip(inputs + np.concatenate([reference(torch.from_numpy(inputs[i:i + 1])).numpy()
                                                for i in range(len(inputs))]), -1, 1)
    db = fidelity_psnr_db(runner.predict(inputs), want)
    assert db >= {"fp32": 90.0, "fp16": 60.0, "compressed": 60.0}[bar], f"{name}: {db:.1f} dB"
