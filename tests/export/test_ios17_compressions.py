"""tbopt export's iOS 17/18 compressions: int8 activations (W8A8) calibrated with the reference
executor, int4 per-block weights, palettes per group of channels and with per-channel scales --
what they need, what they write (against what coremltools itself writes), how the executor runs
them, and that every command takes the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.artifact import Artifact, Preprocessing, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import UsageError
from tinybeauty_cli.core.images import builtin_test_set, synthetic_unlabeled
from tinybeauty_cli.coreml.exec.mlprogram import MLProgramExecutor
from tinybeauty_cli.coreml.exec.quant_ops import QUANT_OPS
from tinybeauty_cli.coreml.runner import open_coreml_runner
from tinybeauty_cli.coreml.spec import coremltools, graph_op_counts, load_spec, mil_program, quiet
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.export.activations import (
    activation_ranges,
    calibration_feeds,
    conversion_additions,
    insert_quantize_dequantize,
    int8_activations,
)
from tinybeauty_cli.export.config import ExportConfig, plan_export
from tinybeauty_cli.flow.export import decompressed_twin, export_file

from tests.helpers import EXPORT_SIZE as SIZE, assert_one_line_error, export, run, small_tinybeauty
from tests.coreml_models import convert



# --- what each needs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, expected", [
    ({"activations": "int8"}, "iOS17"),
    ({"activations": "int8", "weights": "int8"}, "iOS17"),
    ({"activations": "int8", "weights": "pal4"}, "iOS17"),
    ({"weights": "int4"}, "iOS18"),
    ({"weights": "pal4", "granularity": "per-grouped-channel"}, "iOS18"),
    ({"weights": "pal4", "per_channel_scale": True}, "iOS18"),
    ({"activations": "int8", "weights": "int4"}, "iOS18"),
])
def test_the_default_target_is_the_lowest_that_works(kw, expected):
    assert plan_export(ExportConfig(format="mlprogram", **kw), [(0, 100)]).target == expected


@pytest.mark.parametrize("out, kw, match", [
    ("m.mlmodel", {"activations": "int8"}, "needs an ML Program"),
    ("m.mlmodel", {"weights": "int4"}, "needs an ML Program"),
    ("m.mlmodel", {"weights": "pal4", "per_channel_scale": True}, "needs an ML Program"),
    ("m.mlpackage", {"calib": "photos"}, "--calib calibrates int8 activations"),
    ("m.mlpackage", {"weights": "int8", "block_size": 16}, "--block-size applies to --weights int4"),
    ("m.mlpackage", {"granularity": "per-grouped-channel"}, "applies to palettes"),
    ("m.mlpackage", {"weights": "int8", "per_channel_scale": True}, "applies to palettes"),
    ("m.mlpackage", {"weights": "pal4", "group_size": 4}, "--group-size applies to --granularity"),
])
def test_options_only_where_they_apply(out, kw, match):
    with pytest.raises(UsageError, match=match):
        ExportConfig.for_output(out, **kw)


def test_per_channel_scales_and_sparse_weights_are_refused_together():
    with pytest.raises(UsageError, match="--per-channel-scale cannot be stored jointly") as err:
        plan_export(ExportConfig(format="mlprogram", weights="pal4", per_channel_scale=True), [(60, 100)])
    assert "--sparse off" in err.value.hint
    plan = plan_export(ExportConfig(format="mlprogram", weights="pal4", per_channel_scale=True, sparse="off"),
                       [(60, 100)])
    assert plan.target == "iOS18" and not plan.sparse


def test_a_target_below_what_is_needed_names_the_minimum():
    with pytest.raises(UsageError, match="int8 activations .* requires iOS17"):
        plan_export(ExportConfig(format="mlprogram", activations="int8", target="iOS16"), [(0, 100)])
    with pytest.raises(UsageError, match="int4 per-block weights requires iOS18"):
        plan_export(ExportConfig(format="mlprogram", weights="int4", target="iOS17"), [(0, 100)])


@pytest.mark.parametrize("args, match", [
    (["-o", "{tmp}/m.mlmodel", "--activations", "int8"], "needs an ML Program"),
    (["-o", "{tmp}/m.mlpackage", "--activations", "int8", "--target", "iOS16"], "requires iOS17"),
    (["-o", "{tmp}/m.mlpackage", "--weights", "pal4", "--group-size", "4"], "--group-size applies"),
    (["-o", "{tmp}/m.mlpackage", "--block-size", "8"], "--block-size applies"),
])
def test_cli_refusals(tmp_path, small_artifact, args, match):
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_error(run("export", small_artifact, *args), match, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]


# --- the executor's quantize / dequantize ---------------------------------------------------------------------


def _program_with(build):
    ct = coremltools()
    from coremltools.converters.mil.mil import Builder as mb

    prog = mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 2, 3))], opset_version=ct.target.iOS17)(build)
    return prog


@pytest.mark.parametrize("dtype, zero", [("int8", None), ("int8", 3), ("uint8", 128)])
def test_quantize_rounds_half_to_even_and_clips_as_coremltools_evaluates_it(dtype, zero):
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.optimize import _utils as optimize_utils

    scale = np.float32(0.5)
    zp = None if zero is None else np.array(zero, np.int8 if dtype == "int8" else np.uint8)

    def build(x):
        q = mb.quantize(input=x, scale=scale, zero_point=zp, output_dtype=dtype)
        return mb.dequantize(input=q, scale=scale, zero_point=zp)

    prog = _program_with(build)
    ex = MLProgramExecutor(prog)
    assert {"quantize", "dequantize"} <= set(ex.op_counts())
    # exact halves (x / scale = k + 0.5), and values beyond the int8 range
    x = np.array([0.25, 0.75, -0.25, -0.75, 1.25, 1.75, 100.0, -100.0, 0.3, -0.8, 2.25, 63.75] * 2,
                 np.float32).reshape(1, 4, 2, 3)
    got = ex.run({next(iter(prog.functions["main"].inputs)): torch.from_numpy(x)})
    y = next(iter(got.values())).numpy()
    q = optimize_utils.quantize_by_scale_and_zp(x, np.array(scale), zp, dtype)  # coremltools' own evaluation
    want = optimize_utils.dequantize_by_scale_and_zp(q, np.array(scale), zp)
    np.testing.assert_array_equal(y, want)
    assert y.reshape(-1)[0] == 0.0 and y.reshape(-1)[1] == 1.0  # 0.5 -> 0 and 1.5 -> 2: half to even


def test_quantize_along_an_axis():
    from coremltools.converters.mil.mil import Builder as mb

    scale = np.array([0.5, 1.0, 2.0, 4.0], np.float32)

    def build(x):
        q = mb.quantize(input=x, scale=scale, axis=1, output_dtype="int8")
        return mb.dequantize(input=q, scale=scale, axis=1)

    prog = _program_with(build)
    x = torch.linspace(-9, 9, 24).reshape(1, 4, 2, 3)
    y = next(iter(MLProgramExecutor(prog).run({next(iter(prog.functions["main"].inputs)): x}).values()))
    s = torch.from_numpy(scale).view(1, 4, 1, 1)
    torch.testing.assert_close(y, torch.round(x / s) * s, rtol=0, atol=0)
    assert set(QUANT_OPS) == {"quantize", "dequantize"}


# --- int8 activations: tbopt's calibration, coremltools' passes -------------------------------------------------


@pytest.fixture(scope="module")
def float_program():
    """A small TinyBeauty as an fp16 image-I/O ML Program for iOS 17 (coremltools directly)."""
    return convert(small_tinybeauty(), SIZE, image_io=True, target="iOS17")


def _calibration(count, seed=11):
    return synthetic_unlabeled(count, SIZE, seed=seed).inputs


def _patched_predict(mlmodel, monkeypatch):
    """coremltools' calibration with ``MLModel.predict`` (macOS only) answered by the reference executor."""
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger

    executor = MLProgramExecutor(mil_program(mlmodel))
    outputs = [o.name for o in mlmodel.get_spec().description.output]

    def predict_intermediate_outputs(self, inputs, names, compute_units=None):
        seen = {}
        feeds = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()}
        result = executor.run(feeds, lambda n, v: seen.__setitem__(n, v.float().numpy().copy()))
        return {**{n: seen[n] for n in names if n in seen}, **{n: result[n].numpy() for n in outputs}}

    monkeypatch.setattr(ModelDebugger, "predict_intermediate_outputs", predict_intermediate_outputs)


def test_the_file_is_what_coremltools_writes_from_the_same_ranges(float_program, monkeypatch):
    ct = coremltools()
    images = _calibration(1)  # coremltools 9.0 keeps only the last image's range: one image, same ranges
    ours, report = int8_activations(float_program, images, "image", (-1.0, 1.0))
    keep = conversion_additions(mil_program(float_program))
    _patched_predict(float_program, monkeypatch)
    opt = ct.optimize.coreml
    config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric"),
                                    op_name_configs={name: None for name in keep})
    feed = calibration_feeds(images, "image", (-1.0, 1.0))[0]
    input_name = float_program.get_spec().description.input[0].name
    with quiet():
        theirs = opt.linear_quantize_activations(float_program, config, [{input_name: feed}])
    a, b = ours.get_spec(), theirs.get_spec()
    assert a.specificationVersion == b.specificationVersion == 8  # iOS 17
    assert a.mlProgram == b.mlProgram  # op for op, scale for scale
    assert report.pairs == graph_op_counts(a)["quantize"] > 0


def test_ranges_cover_every_calibration_image(float_program):
    feeds = calibration_feeds(_calibration(3), "image", (-1.0, 1.0))
    together = activation_ranges(float_program, feeds)
    alone = [activation_ranges(float_program, [f]) for f in feeds]
    assert set(together) == set(alone[0])
    for name, r in together.items():
        assert r["rmin"] == min(a[name]["rmin"] for a in alone)
        assert r["rmax"] == max(a[name]["rmax"] for a in alone)
    assert len(together) > 20


def test_the_made_up_image_addition_stays_float(float_program):
    keep = conversion_additions(mil_program(float_program))
    assert keep  # the x + r of an image-I/O model
    quantized, _ = int8_activations(float_program, _calibration(2), "image", (-1.0, 1.0))
    fn = mil_program(quantized).functions["main"]
    kept = [op for op in fn.operations if op.op_type == "add" and op.name in keep]
    assert kept
    for op in kept:  # the input side is not quantized, nor is the sum (r, after conv + tanh, is)
        assert any(v.op is None or v.op.op_type != "dequantize" for v in (op.x, op.y))
        assert all(child.op_type != "quantize" for child in op.outputs[0].child_ops)
    everything = insert_quantize_dequantize(float_program, activation_ranges(
        float_program, calibration_feeds(_calibration(2), "image", (-1.0, 1.0))))
    assert graph_op_counts(everything.get_spec())["quantize"] > graph_op_counts(quantized.get_spec())["quantize"]


def test_w8a8_export_runs_in_the_executor(tmp_path, small_artifact):
    out = tmp_path / "w8a8.mlpackage"
    r = export(small_artifact, out, weights="int8", activations="int8", calib_count=4)
    assert r.target == "iOS17"
    assert r.ops["quantize"] == r.activations["quantize_dequantize_pairs"] > 0
    assert r.ops["dequantize"] >= r.ops["quantize"]  # a quantized tensor read by two ops: two dequantizes
    assert r.activations["images"] == 4 and "synthetic portraits" in r.activations["calibration"]
    assert r.validation["weight_storage"]["int8 linear"] == 10  # W8: every conv weight
    assert "reference executor" in r.validation["numerical_check"]
    assert r.validation["fidelity_psnr_db"] > 30
    assert json.loads(load_spec(out).description.metadata.userDefined["tbopt.export"])["activations"] == "int8"
    # the executor runs it, and the activations are really quantized: the twin with the same int8
    # weights and float activations differs, a little
    
    x = builtin_test_set(SIZE, limit=2).inputs.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    w8a8 = open_coreml_runner(out, use_device=False, round_image_output=False).residual(x)
    with torch.no_grad():
        w8 = decompressed_twin(out, load_model(small_artifact))(torch.from_numpy(x)).numpy()
    assert 0 < np.abs(w8a8 - w8).max() < 0.2


def test_calibration_from_a_folder(tmp_path, small_artifact):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(builtin_test_set(48, limit=3).inputs):
        Image.fromarray(img).save(photos / f"p{i}.png")
    out = tmp_path / "a8.mlpackage"
    r = run("export", small_artifact, "-o", out, "--size", SIZE, "--activations", "int8", "--calib", photos,
            "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["activations"]["images"] == 3 and str(photos) in d["activations"]["calibration"]


# --- int4 per block, palettes per group of channels, per-channel scales -----------------------------------------


def _conv_weights(path, kind="conv"):
    return [w for w in stored_weights(path) if w.kind == kind and w.field == "weight"]


def test_int4_per_block(tmp_path, small_artifact):
    out = tmp_path / "int4.mlpackage"
    r = export(small_artifact, out, weights="int4", block_size=4)
    assert r.target == "iOS18" and "int4 per-block" in r.weights
    assert r.validation["weight_storage"]["int4 linear per-block"] == 10  # none left in fp16
    assert r.validation["fidelity_psnr_db"] > 25
    for w in _conv_weights(out):
        c_out, c_in = w.value.shape[:2]
        block = 4 if c_in % 4 == 0 else 1  # the 3-channel first layer: blocks of gcd(3, 4) = 1
        for o in range(c_out):
            for b in range(c_in // block):
                assert len(np.unique(w.value[o, b * block:(b + 1) * block])) <= 16


@pytest.mark.parametrize("scale", [False, True])
def test_palettes_per_group_of_channels(tmp_path, small_artifact, scale):
    out = tmp_path / "g.mlpackage"
    r = export(small_artifact, out, weights="pal4", granularity="per-grouped-channel", group_size=4,
               per_channel_scale=scale)
    assert r.target == "iOS18"
    held = r.validation["weight_storage"]
    if scale:  # coremltools (before iOS 26) folds the scales into a copy of the table per weight position
        assert sum(n for k, n in held.items() if k.endswith("+per-channel scale")) == 10
    else:  # the 8-channel convolutions: two tables of four channels; the 3-channel output: one per channel
        assert held["palettized 4-bit (2 tables)"] == 9 and held["palettized 4-bit (3 tables)"] == 1
    assert r.validation["fidelity_psnr_db"] > 25
    for w in _conv_weights(out):
        group = 4 if w.value.shape[0] % 4 == 0 else 1  # the 3-channel output layer: one table per channel
        for g in range(w.value.shape[0] // group):
            values = w.value[g * group:(g + 1) * group]
            if not scale:
                assert len(np.unique(values)) <= 16
    if scale:
        ops = graph_op_counts(load_spec(out))
        assert ops["constexpr_blockwise_shift_scale"] == ops["constexpr_lut_to_dense"] == 10


def test_grouped_palettes_beat_one_table_per_tensor(tmp_path, small_artifact):
    one = export(small_artifact, tmp_path / "t.mlpackage", weights="pal2")
    grouped = export(small_artifact, tmp_path / "g.mlpackage", weights="pal2", granularity="per-grouped-channel",
                     group_size=2)
    assert grouped.validation["fidelity_psnr_db"] > one.validation["fidelity_psnr_db"]


@pytest.mark.parametrize("kw", [
    {"weights": "int4"},
    {"weights": "pal4", "granularity": "per-grouped-channel", "per_channel_scale": True},
])
def test_the_executor_computes_what_the_weights_twin_does(tmp_path, small_artifact, kw):
    """The executor's decompression of the new constexpr ops is the weight reader's."""
    
    out = tmp_path / "m.mlpackage"
    export(small_artifact, out, io="tensor", **kw)
    x = builtin_test_set(SIZE, limit=2).inputs.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    got = open_coreml_runner(out, use_device=False).residual(x)
    twin = decompressed_twin(out, load_model(small_artifact))
    with torch.no_grad():
        want = twin(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.01  # fp16 compute


# --- every command takes the files ----------------------------------------------------------------------------


def test_bench_compare_apply_and_info_take_every_new_kind(tmp_path):
    model = small_tinybeauty()
    small_artifact = tmp_path / "small32.pt"
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), preprocessing=Preprocessing(size=SIZE)),
                  small_artifact)
    files = {  # int8 activations with int4 weights; grouped palettes with per-channel scales
        "a8int4": dict(weights="int4", activations="int8", calib_count=2),
        "gpal4": dict(weights="pal4", granularity="per-grouped-channel", per_channel_scale=True),
    }
    paths = []
    for name, kw in files.items():
        paths.append(tmp_path / f"{name}.mlpackage")
        export_file(small_artifact, paths[-1], ExportConfig.for_output(paths[-1], **kw))
    r = run("bench", small_artifact, *paths, "--limit", 2, "--no-timing", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 3 and all(row["fidelity_psnr_db"] for row in rows[1:])
    r = run("compare", small_artifact, paths[0], "--limit", 2, "-o", tmp_path / "cmp", "--no-timing", "--json")
    assert r.exit_code == 0, r.stderr
    photo = tmp_path / "face.png"
    Image.fromarray(builtin_test_set(SIZE, limit=1).inputs[0]).save(photo)
    for p in paths:
        r = run("apply", p, photo, "-o", tmp_path / f"out_{p.stem}", "--json")
        assert r.exit_code == 0, r.stderr
        r = run("info", p, "--json")
        assert r.exit_code == 0, r.stderr
    info = json.loads(run("info", paths[0], "--json").stdout)
    assert "quantize" in json.dumps(info)
