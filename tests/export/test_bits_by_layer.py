"""tbopt export --bits-by-layer auto: palette bits chosen per layer from measured sensitivities --
the choice is the cheapest sum, it respects the byte budget of uniform palettes, the file holds
the bits it records, the reference executor runs it closer to the float model than uniform
palettes, fitting keeps each layer's bits, and the recorded command makes the same file."""

from __future__ import annotations

import itertools
import json
from functools import partial

import numpy as np
import pytest
import torch

from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.errors import UsageError
from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model
from tinybeauty_cli.core.quality import fidelity_psnr_db, made_up
from tinybeauty_cli.coreml.runner import open_coreml_runner
from tinybeauty_cli.coreml.spec import load_spec
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.export.config import ExportConfig, palette_bits_for, plan_export
from tinybeauty_cli.export.mixed import _blob, _cheapest_sum, nn_palette_bytes, palette_bytes
from tinybeauty_cli.export.palettes import PALETTIZED, palettes_fitted

from tests import helpers
from tests.helpers import EXPORT_SIZE as SIZE, export_and_rebuild_by_its_command, small_tinybeauty

export = partial(helpers.export, calib_count=2)  # two calibration images are enough at 32x32


@pytest.fixture
def sensitive_artifact(tmp_path):
    """A small TinyBeauty (width 16) whose first convolution carries most of the palette error, as
    a trained network's often does: its weights spread wide, the others narrow."""
    model = small_tinybeauty(seed=1, dim=16)
    with torch.no_grad():
        model.content_encoder.conv_first.conv.weight.mul_(4.0)
    path = tmp_path / "sensitive.pt"
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), preprocessing=Preprocessing(size=SIZE)),
                  path)
    return path


def _palette_bits(path):
    """The palette size of every conv weight of a file, in graph order (read from its ops or layers)."""
    bits = []
    for w in stored_weights(path):
        if (w.kind, w.field) in (("conv", "weight"), ("convolution", "weights")):
            assert w.storage.startswith("palettized "), w.storage
            bits.append(int(w.storage.split()[1].split("-")[0]))
    return bits


# --- the options ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out, kw, match", [
    ("m.mlpackage", {"bits_by_layer": "auto"}, "--bits-by-layer chooses palette sizes"),
    ("m.mlpackage", {"weights": "int8", "bits_by_layer": "auto"}, "--bits-by-layer chooses palette sizes"),
    ("m.mlmodel", {"weights": "int8", "bits_by_layer": "auto"}, "--bits-by-layer chooses palette sizes"),
])
def test_bits_by_layer_only_with_palettes(out, kw, match):
    with pytest.raises(UsageError, match=match):
        ExportConfig.for_output(out, **kw)


def test_a_neural_network_keeps_its_target_and_3_bits():
    """NeuralNetwork palettes take 1 to 8 bits from iOS 13 on: the choice does not raise the target."""
    auto = ExportConfig.for_output("m.mlmodel", weights="pal4", bits_by_layer="auto")
    assert auto.format == "neuralnetwork" and plan_export(auto, [(0, 100)]).target == "iOS13"


def test_the_target_decides_whether_3_bits_are_a_choice():
    auto = ExportConfig(format="mlprogram", weights="pal4", bits_by_layer="auto")
    assert plan_export(auto, [(0, 100)]).target == "iOS18"
    lower = ExportConfig(format="mlprogram", weights="pal4", bits_by_layer="auto", target="iOS16")
    assert plan_export(lower, [(0, 100)]).target == "iOS16"
    assert 3 in palette_bits_for("iOS18") and 3 not in palette_bits_for("iOS16")
    assert ExportConfig(format="mlprogram", weights="pal4", bits_by_layer="auto", calib="photos").calib == "photos"


def test_the_command_line_names_the_option():
    cfg = ExportConfig(format="mlprogram", weights="pal4", bits_by_layer="auto", calib="photos", calib_count=4)
    line = cfg.command_line("m.pt", "m.mlpackage")
    assert "--weights pal4 --bits-by-layer auto" in line and "--calib photos" in line and "--calib-count 4" in line
    assert ExportConfig.from_dict(cfg.to_dict()) == cfg


# --- the choice ----------------------------------------------------------------------------------------------


def test_the_cheapest_sum_is_the_best_choice_under_the_budget():
    rng = np.random.default_rng(0)
    costs = [list(rng.integers(50, 400, 4)) for _ in range(5)]
    values = [list(rng.random(4)) for _ in range(5)]
    budget = 900
    picks = _cheapest_sum(costs, values, budget)
    best = min((sum(v[i] for v, i in zip(values, choice)), choice)
               for choice in itertools.product(range(4), repeat=5)
               if sum(c[i] for c, i in zip(costs, choice)) <= budget)
    assert sum(c[i] for c, i in zip(costs, picks)) <= budget
    assert sum(v[i] for v, i in zip(values, picks)) == pytest.approx(best[0])


@pytest.mark.parametrize("numel", [300, 1001])
def test_the_neural_network_bytes_are_those_coremltools_writes(numel):
    """A weight palettized by coremltools' own NeuralNetwork writer takes the bytes the budget counts."""
    from coremltools.models import _QUANTIZATION_MODE_CUSTOM_LOOKUP_TABLE
    from coremltools.models.neural_network import quantization_utils as qu
    from coremltools.proto import NeuralNetwork_pb2

    from tinybeauty_cli.export.palettes import kmeans_lut

    values = np.random.default_rng(numel).standard_normal(numel).astype(np.float32)
    for bits in range(1, 9):
        wp = NeuralNetwork_pb2.WeightParams()
        wp.floatValue.extend(values)
        qu._quantize_wp_field(wp, bits, _QUANTIZATION_MODE_CUSTOM_LOOKUP_TABLE, (numel,),
                              lut_function=lambda n, w: kmeans_lut(w, n))
        assert wp.quantization.numberOfBits == bits and not len(wp.floatValue)
        assert wp.ByteSize() == nn_palette_bytes(numel, bits), bits


# --- the file ------------------------------------------------------------------------------------------------


def test_the_file_holds_the_recorded_bits_within_the_size_of_uniform_palettes(tmp_path, sensitive_artifact):
    uniform = export(sensitive_artifact, tmp_path / "u.mlpackage", weights="pal4")  # iOS16
    out = tmp_path / "auto.mlpackage"
    r = export(sensitive_artifact, out, weights="pal4", bits_by_layer="auto")
    assert r.target == "iOS18"
    assert r.size_bytes <= uniform.size_bytes
    chosen = [layer["bits"] for layer in r.bits_by_layer["layers"]]
    assert _palette_bits(out) == chosen and len(set(chosen)) > 1  # the ops hold the bits chosen, in graph order
    assert json.loads(load_spec(out).description.metadata.userDefined["tbopt.bits_by_layer"]) == chosen
    assert r.bits_by_layer["weight_bytes"] <= r.bits_by_layer["budget_bytes"] < r.bits_by_layer["uniform_bytes"]
    assert r.bits_by_layer["uniform_bytes"] == sum(palette_bytes(int(np.prod(layer["shape"])), layer["shape"][0], 4)
                                                   for layer in r.bits_by_layer["layers"])
    assert chosen[0] > 4  # the first convolution, where the error is, gets more bits
    assert r.bits_by_layer["predicted_gain_db"] > 0 and set(chosen) <= set(palette_bits_for("iOS18"))
    assert "--bits-by-layer auto" in r.command
    # the estimate of the bytes is the file's: the weight files differ by the index blobs it predicts (tables
    # this small stay in the graph description), but for the padding of the last blob, which is not padded
    def blobs(bits):
        return sum(_blob(-(-int(np.prod(layer["shape"])) * b // 8)) for layer, b in zip(r.bits_by_layer["layers"], bits))

    assert abs((r.weight_bytes - uniform.weight_bytes) - (blobs(chosen) - blobs([4] * len(chosen)))) < 64

    # the reference executor runs it, closer to the float model than uniform palettes
    assert _fidelity(out, sensitive_artifact) > _fidelity(tmp_path / "u.mlpackage", sensitive_artifact) + 0.5


def _fidelity(path, source):
    """PSNR of the reference executor's made-up images from ``path`` against ``source``'s float model."""
    from tinybeauty_cli.core.checkpoint import load_model

    model = load_model(source).module
    x = uint8_to_model(builtin_test_set(SIZE, limit=4).inputs)
    with torch.no_grad():
        want = made_up(torch.from_numpy(x), model(torch.from_numpy(x))).numpy()
    got = made_up(x, open_coreml_runner(path, use_device=False, round_image_output=False).residual(x))
    return fidelity_psnr_db(got, want)


def test_a_neural_network_holds_the_recorded_bits_within_the_size_of_uniform_palettes(tmp_path,
                                                                                     sensitive_artifact):
    """The .mlmodel (iOS 13): one quantize_weights pass per size, fp32 tables, indices packed to the byte."""
    uniform = export(sensitive_artifact, tmp_path / "u.mlmodel", weights="pal4")
    out = tmp_path / "auto.mlmodel"
    r = export(sensitive_artifact, out, weights="pal4", bits_by_layer="auto")
    assert r.target == uniform.target == "iOS13"
    assert r.size_bytes <= uniform.size_bytes
    chosen = [layer["bits"] for layer in r.bits_by_layer["layers"]]
    assert _palette_bits(out) == chosen and len(set(chosen)) > 1 and chosen[0] > 4
    assert _palette_bits(tmp_path / "u.mlmodel") == [4] * len(chosen)
    spec = load_spec(out)
    assert json.loads(spec.description.metadata.userDefined["tbopt.bits_by_layer"]) == chosen
    # the layers the report names are the file's, and each weight takes the bytes the budget counted
    layers = {layer.name: layer for layer in spec.neuralNetwork.layers}
    for entry in r.bits_by_layer["layers"]:
        weights = layers[entry["op"]].convolution.weights
        assert weights.quantization.numberOfBits == entry["bits"]
        assert weights.ByteSize() == entry["bytes"] == nn_palette_bytes(int(np.prod(entry["shape"])), entry["bits"])
    assert r.bits_by_layer["weight_bytes"] <= r.bits_by_layer["budget_bytes"] < r.bits_by_layer["uniform_bytes"]
    assert r.bits_by_layer["uniform_bytes"] == sum(nn_palette_bytes(int(np.prod(layer["shape"])), 4)
                                                   for layer in r.bits_by_layer["layers"])
    assert "--bits-by-layer auto" in r.command and r.bits_by_layer["predicted_gain_db"] > 0
    assert _fidelity(out, sensitive_artifact) > _fidelity(tmp_path / "u.mlmodel", sensitive_artifact) + 0.5


def test_fitting_keeps_each_layers_bits(sensitive_artifact):
    from tinybeauty_cli.core.checkpoint import load_model

    model = load_model(sensitive_artifact).module
    names = [n for n, m in model.named_modules() if isinstance(m, PALETTIZED)]
    bits = {n: b for n, b in zip(names, itertools.cycle((6, 3, 4)))}
    x = torch.from_numpy(uint8_to_model(builtin_test_set(SIZE, limit=4).inputs))
    fitted, fit = palettes_fitted(model, bits, x, steps=2, batch_size=2)
    assert fit.bits == bits
    for name in names:
        assert len(np.unique(fitted.get_submodule(name).weight.detach().numpy())) <= 2 ** bits[name]


@pytest.mark.parametrize("name", ["fit.mlpackage", "fit.mlmodel"])
def test_fitted_bits_by_layer_export_stores_the_fitted_values(tmp_path, sensitive_artifact, name):
    out = tmp_path / name
    r = export(sensitive_artifact, out, weights="pal4", bits_by_layer="auto", fit_palettes=2, fit_images=4)
    assert r.palette_fit["bits"] == [layer["bits"] for layer in r.bits_by_layer["layers"]]
    assert _palette_bits(out) == [layer["bits"] for layer in r.bits_by_layer["layers"]]
    assert r.validation["max_weight_error"] < 1e-3  # fitted values: stored as they are (fp16), not re-clustered


@pytest.mark.parametrize("name", ["m.mlpackage", "m.mlmodel"])
def test_the_recorded_command_makes_the_same_file(tmp_path, sensitive_artifact, name):
    export_and_rebuild_by_its_command(tmp_path, [str(sensitive_artifact), "--weights", "pal4", "--bits-by-layer", "auto",
                                                 "--calib-count", "2"], name)


def test_a_model_with_nothing_to_win_says_so(tmp_path, small_artifact):
    """A random network's layers are equally sensitive: the record of the choice costs bytes that
    uniform palettes need, so the closest choice under the budget is kept, and the report says so."""
    # no larger than uniform palettes for the same target (iOS18 ops take a few bytes more each than iOS16's)
    uniform = export(small_artifact, tmp_path / "u.mlpackage", weights="pal4", target="iOS18")
    r = export(small_artifact, tmp_path / "a.mlpackage", weights="pal4", bits_by_layer="auto")
    assert r.size_bytes <= uniform.size_bytes
    assert r.bits_by_layer["predicted_gain_db"] < 0
    assert any("no choice within the budget" in n for n in r.notes)
