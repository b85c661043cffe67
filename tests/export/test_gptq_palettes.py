"""tbopt export --palette-method gptq: palette entries chosen by GPTQ and table values refit on the
calibration images -- the option's rules, the layer algorithm beating nearest-entry k-means on the
layer's output, the file holding the same ops and weight bytes as plain palettes with the GPTQ
values stored exactly, the reference executor running it closer to the float model, the recorded
command making the same file, and the released checkpoint's figure on the real face (slow)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import ConfigError, UsageError
from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model
from tinybeauty_cli.core.quality import fidelity_psnr_db, made_up
from tinybeauty_cli.coreml.runner import open_coreml_runner
from tinybeauty_cli.coreml.spec import graph_op_counts, load_spec
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.export.config import ExportConfig
from tinybeauty_cli.export.palette_gptq import gptq_palettized, palettize_layer
from tinybeauty_cli.export.palettes import PALETTIZED
from tinybeauty_cli.flow.export import export_file

from tests import helpers
from tests.helpers import EXPORT_SIZE as SIZE, REALDATA, export_and_rebuild_by_its_command, run, small_tinybeauty

export = partial(helpers.export, calib_count=2)  # two calibration images are enough at 32x32


def _fidelity(path, source, images=4):
    """PSNR of the reference executor's made-up images (8-bit output) against ``source``'s float model."""
    model = load_model(source).module
    x = uint8_to_model(builtin_test_set(SIZE, limit=images).inputs)
    with torch.no_grad():
        want = made_up(torch.from_numpy(x), model(torch.from_numpy(x))).numpy()
    got = open_coreml_runner(path, use_device=False).predict(x)
    return fidelity_psnr_db(got, want)


# --- the option ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    ({"weights": "int8", "palette_method": "gptq"}, UsageError, "chooses palette entries"),
    ({"palette_method": "gptq"}, UsageError, "chooses palette entries"),
    ({"weights": "pal4", "palette_method": "gptq", "granularity": "per-grouped-channel", "per_channel_scale": True},
     UsageError, "--per-channel-scale"),
    ({"weights": "pal4", "palette_method": "obs"}, ConfigError, "--palette-method must be one of"),
])
def test_only_where_it_applies(kw, error, match):
    with pytest.raises(error, match=match):
        ExportConfig.for_output("m.mlpackage", **kw)


def test_the_command_line_names_it_and_its_calibration():
    config = ExportConfig.for_output("m.mlpackage", weights="pal4", palette_method="gptq", calib="faces",
                                     calib_count=8)
    line = config.command_line("ckpt.pt", "m.mlpackage")
    assert "--palette-method gptq" in line and "--calib faces" in line and "--calib-count 8" in line
    assert "--palette-method" not in ExportConfig.for_output("m.mlpackage", weights="pal4").command_line()


# --- one layer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 2])
def test_a_layer_loses_less_output_than_nearest_k_means_entries(group_size):
    """On correlated inputs (as image patches are), GPTQ's entries and refit tables give a smaller
    output error than rounding each weight to its nearest k-means entry, in no more table entries."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    mix = torch.randn(36, 36, generator=g) + 3 * torch.eye(36)
    x = torch.randn(2000, 36, generator=g, dtype=torch.float64) @ mix.double()  # correlated columns
    h = x.T @ x / len(x)
    snapped, kmeans_error, gptq_error = palettize_layer(w, h, 3, group_size)
    assert snapped.shape == w.shape and snapped.dtype == w.dtype
    assert gptq_error < 0.8 * kmeans_error
    for rows in (snapped,) if group_size is None else snapped.split(group_size):
        assert len(torch.unique(rows)) <= 8


# --- the file ------------------------------------------------------------------------------------------------


def test_same_ops_and_weight_bytes_closer_to_the_float_model(tmp_path, small_artifact):
    plain = export(small_artifact, tmp_path / "k.mlpackage", weights="pal3")
    out = tmp_path / "g.mlpackage"
    r = export(small_artifact, out, weights="pal3", palette_method="gptq")
    assert r.target == plain.target == "iOS18"
    assert graph_op_counts(load_spec(out)) == graph_op_counts(load_spec(tmp_path / "k.mlpackage"))
    assert r.weight_bytes == plain.weight_bytes  # the same tables and index blobs
    assert r.size_bytes - plain.size_bytes < 600  # the record of what GPTQ did, in the history
    assert r.palette_gptq["layers"] == sum(1 for m in load_model(small_artifact).module.modules()
                                           if isinstance(m, PALETTIZED))
    assert r.palette_gptq["output_error_gptq_db"] < r.palette_gptq["output_error_kmeans_db"]
    assert r.palette_gptq["calibration"].startswith("synthetic portraits (2")
    assert "LUT chosen by GPTQ" in r.weights and "--palette-method gptq" in r.command
    history = json.loads(load_spec(out).description.metadata.userDefined["tbopt.history"])
    assert [h["step"] for h in history][-2:] == ["gptq-palettes", "export"]
    # every palettized tensor holds at most 8 values, stored exactly (the validation's twin is the GPTQ model)
    assert all(w.storage.startswith("palettized 3-bit") for w in stored_weights(out) if w.field == "weight"
               and w.kind == "conv")
    assert r.validation["max_weight_error"] < 1e-3
    assert _fidelity(out, small_artifact) > _fidelity(tmp_path / "k.mlpackage", small_artifact)


def test_a_neural_network_and_grouped_tables(tmp_path, small_artifact):
    """The .mlmodel (coremltools' quantize_weights, custom tables) and per-group tables store the GPTQ values."""
    r = export(small_artifact, tmp_path / "g.mlmodel", weights="pal4", palette_method="gptq")
    assert r.validation["max_weight_error"] < 1e-3 and r.palette_gptq["layers"] > 0
    r = export(small_artifact, tmp_path / "g.mlpackage", weights="pal2", palette_method="gptq",
               granularity="per-grouped-channel", group_size=4)
    assert r.validation["max_weight_error"] < 1e-3 and r.palette_gptq["group_size"] == 4


def test_fitting_after_gptq_distils_from_the_float_model(tmp_path, small_artifact):
    """The fit trains the GPTQ tables towards the float model, not towards the GPTQ model itself
    (which would be a loss of zero from the first step)."""
    r = export(small_artifact, tmp_path / "f.mlpackage", weights="pal2", palette_method="gptq", fit_palettes=3)
    assert r.palette_fit["first_loss"] > 0 and r.palette_fit["palette_error_before"] > 0
    assert r.validation["max_weight_error"] < 1e-3
    assert "--palette-method gptq" in r.command and "--fit-palettes 3" in r.command


def test_bits_by_layer_then_gptq_keeps_each_layers_bits(small_artifact):
    model = load_model(small_artifact).module
    names = [n for n, m in model.named_modules() if isinstance(m, PALETTIZED)]
    bits = {n: 2 + i % 3 for i, n in enumerate(names)}
    x = torch.from_numpy(uint8_to_model(builtin_test_set(SIZE, limit=2).inputs))
    out, report = gptq_palettized(model, bits, x)
    layers = dict(out.named_modules())
    for n in names:
        assert len(torch.unique(layers[n].weight)) <= 1 << bits[n]
    assert report.layers == len(names) and report.to_dict()["bits"] == list(bits.values())
    assert torch.equal(model.out.conv.weight, load_model(small_artifact).module.out.conv.weight)  # left as is


def test_the_recorded_command_makes_the_same_file_and_the_commands_take_it(tmp_path):
    model = small_tinybeauty()
    small_artifact = tmp_path / "small32.pt"  # a model of the file's size: bench compares them image for image
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), preprocessing=Preprocessing(size=SIZE)),
                  small_artifact)
    path, _ = export_and_rebuild_by_its_command(tmp_path, [str(small_artifact), "--weights", "pal4", "--palette-method",
                                                           "gptq", "--calib-count", "2"], "g.mlpackage")
    r = run("bench", str(small_artifact), str(path), "--limit", "2", "--no-timing", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["rows"][1]["fidelity_psnr_db"] > 0
    r = run("compare", str(small_artifact), str(path), "--limit", "2", "-o", str(tmp_path / "cmp"),
                            "--no-timing", "--json")
    assert r.exit_code == 0, r.stderr
    photo = tmp_path / "face.png"
    Image.fromarray(builtin_test_set(SIZE, limit=1).inputs[0]).save(photo)
    r = run("apply", str(path), str(photo), "-o", str(tmp_path / "out"), "--json")
    assert r.exit_code == 0, r.stderr


# --- the released checkpoint on the real face ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "tinybeauty_style1.pt").exists(), reason="realdata not beside the checkout")
def test_the_released_checkpoint_gains_3_db_on_the_real_face_at_the_same_size(tmp_path):
    from tinybeauty_cli.core.images import load_folder
    from tinybeauty_cli.measure.evaluate import evaluate
    from tinybeauty_cli.runtime.runners import TorchRunner

    ckpt = REALDATA / "tinybeauty_style1.pt"
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "face_01.png").symlink_to(REALDATA / "face_01.png")
    face = load_folder(faces, 256)
    reference = evaluate(TorchRunner(load_model(ckpt).module), face).outputs
    results = {}
    for method in ("kmeans", "gptq"):
        out = tmp_path / f"{method}.mlpackage"
        r = export_file(ckpt, out, ExportConfig.for_output(out, weights="pal4", palette_method=method))
        ev = evaluate(open_coreml_runner(out, use_device=False), face, reference=reference)
        results[method] = (r.size_bytes, ev.fidelity_psnr_db)
    (k_size, k_db), (g_size, g_db) = results["kmeans"], results["gptq"]
    assert g_size <= 1.02 * k_size
    assert g_db >= k_db + 3.0, results


def test_gptq_palettes_of_the_same_weights_are_computed_once_for_several_targets(tmp_path, small_artifact, monkeypatch):
    """``tbopt optimize`` exports one model for several targets: the GPTQ palettes (keyed by the weights,
    tables and calibration images) are computed once and both files store the same values."""
    from tinybeauty_cli.flow import export as export_flow  # noqa: PLC0415
    from tinybeauty_cli.flow.export import export_loaded  # noqa: PLC0415

    calls = []
    real = export_flow.gptq_palettized
    monkeypatch.setattr(export_flow, "gptq_palettized", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded, fits = load_model(small_artifact), {}
    config = ExportConfig(format="neuralnetwork", weights="pal4", palette_method="gptq", calib_count=2)
    first = export_loaded(loaded, tmp_path / "a.mlmodel", config, fits=fits)
    second = export_loaded(loaded, tmp_path / "b.mlpackage", ExportConfig(
        format="mlprogram", weights="pal4", palette_method="gptq", calib_count=2, target="iOS16"), fits=fits)
    assert len(calls) == 1 and not first.palette_gptq["reused"] and second.palette_gptq["reused"]
    def palettized(path):
        return sorted((w.value for w in stored_weights(path) if w.storage.startswith("palettized")),
                      key=lambda v: (v.shape, float(abs(v).sum())))

    conv, again = palettized(tmp_path / "a.mlmodel"), palettized(tmp_path / "b.mlpackage")
    assert len(conv) == len(again) > 0
    assert all(a.shape == b.shape and abs(a - b).max() < 1e-3 for a, b in zip(conv, again))
    other = export_loaded(loaded, tmp_path / "c.mlmodel", ExportConfig(
        format="neuralnetwork", weights="pal4", palette_method="gptq", calib_count=3), fits=fits)
    assert len(calls) == 2 and not other.palette_gptq["reused"]  # other calibration images: computed again
