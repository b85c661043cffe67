"""tbopt export: Core ML files for iOS, their compression, their graphs and their refusals."""

from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest
import torch

from tinybeauty_cli.core.artifact import Artifact, HistoryStep, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import OutputExistsError, UnsupportedError, UsageError
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig
from tinybeauty_cli.core.training import FitConfig
from tinybeauty_cli.coreml.compact import compact_program
from tinybeauty_cli.coreml.spec import coremltools, load_program, quiet
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.export.config import ExportConfig, ExportError, plan_export
from tinybeauty_cli.export.palettes import fit_palettes, kmeans_lut, palettes_fitted
from tinybeauty_cli.flow.export import decompressed_twin, export_file

from tests.helpers import EXPORT_SIZE as SIZE, REAL_CKPT, assert_one_line_error, export, run, small_tinybeauty



def spec_of(path):
    ct = coremltools()
    with quiet():
        return ct.utils.load_spec(str(path))


@pytest.fixture
def pruned_artifact(tmp_path):
    """A channel-pruned TinyBeauty: every group has its own width (as `tbopt prune` leaves it)."""
    torch.manual_seed(1)
    model = TinyBeauty(TinyBeautyConfig(n_res=1, first=5, down1=6, stream=7, res_hidden=(3, 4), up1=5, up2=6)).eval()
    path = tmp_path / "pruned.pt"
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(),
                                          history=[HistoryStep.now("prune", "tbopt prune")]), path)
    return path


@pytest.fixture
def sparse_artifact(tmp_path):
    """A TinyBeauty whose conv weights are 60% exact zeros (unstructured pruning)."""
    model = small_tinybeauty(seed=2)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                w = mod.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(w.numel() * 0.6)).values] = 0
    path = tmp_path / "sparse.pt"
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict()), path)
    return path


# --- what each format and compression needs ------------------------------------------------------


@pytest.mark.parametrize("fmt, weights, sparse, expected", [
    ("neuralnetwork", None, False, "iOS13"),
    ("neuralnetwork", "pal4", False, "iOS13"),
    ("mlprogram", None, False, "iOS15"),
    ("mlprogram", "int8", False, "iOS16"),
    ("mlprogram", "pal4", False, "iOS16"),
    ("mlprogram", "pal3", False, "iOS18"),
    ("mlprogram", None, True, "iOS16"),
    ("mlprogram", "pal4", True, "iOS18"),
    ("mlprogram", "int8", True, "iOS18"),
])
def test_the_default_target_is_the_lowest_that_works(fmt, weights, sparse, expected):
    zeros = [(50, 100)] if sparse else [(0, 100)]
    assert plan_export(ExportConfig(format=fmt, weights=weights), zeros).target == expected


def test_a_target_below_what_is_needed_names_the_minimum():
    with pytest.raises(UsageError, match="needs|requires") as err:
        plan_export(ExportConfig(format="mlprogram", weights="pal4", target="ios15"), [(0, 100)])
    assert "iOS16" in str(err.value)
    with pytest.raises(UsageError, match="iOS18") as err:
        plan_export(ExportConfig(format="mlprogram", weights="pal4", target="iOS16"), [(60, 100)])
    assert "--sparse off" in err.value.hint
    # --sparse off makes the same request valid at iOS16
    plan = plan_export(ExportConfig(format="mlprogram", weights="pal4", target="iOS16", sparse="off"), [(60, 100)])
    assert plan.target == "iOS16" and not plan.sparse


def test_sparse_storage_only_where_it_pays():
    # 2-bit palettes: a 1-bit mask pays only beyond ~52% zeros
    plan = plan_export(ExportConfig(format="mlprogram", weights="pal2"), [(30, 100)])
    assert not plan.sparse and "stored dense" in plan.notes[0]
    plan = plan_export(ExportConfig(format="neuralnetwork"), [(50, 100)])
    assert not plan.sparse and "NeuralNetwork format cannot store them sparse" in plan.notes[0]
    assert not plan_export(ExportConfig(format="mlprogram"), [(5, 100)]).sparse  # under 10%: not pruned


def test_bad_requests_are_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match=r"\.mlmodel .*\.mlpackage"):
        ExportConfig.for_output(tmp_path / "model.onnx")
    with pytest.raises(UsageError, match="NeuralNetwork format"):
        ExportConfig.for_output(tmp_path / "m.mlmodel", target="iOS16")
    with pytest.raises(UsageError, match="--fp32"):
        ExportConfig(weights="fp16", precision="fp32")


def test_kmeans_palette():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 24, 3, 3)).astype(np.float32)
    lut, idx = kmeans_lut(w, 4)
    assert lut.shape == (16,) and idx.shape == (w.size,) and idx.max() < 16
    assert np.all(np.diff(lut) > 0)  # sorted palette
    err = np.abs(lut[idx].reshape(w.shape) - w).mean()
    uniform = np.linspace(w.min(), w.max(), 16)
    uniform_err = np.abs(uniform[np.abs(w.reshape(-1, 1) - uniform).argmin(1)].reshape(w.shape) - w).mean()
    assert err < 0.8 * uniform_err  # k-means beats an even grid on bell-shaped weights
    few = np.array([0.5, -0.25, 0.5, 0.0], np.float32)  # no more values than entries: exact
    lut, idx = kmeans_lut(few, 2)
    np.testing.assert_array_equal(lut[idx], few)


def test_fit_palettes_leaves_weights_the_export_stores_exactly(tmp_path, small_artifact):
    loaded = load_model(small_artifact)
    model = loaded.artifact.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen_x = torch.rand(8, 3, SIZE, SIZE) * 2 - 1

    def batch_fn(step, gen):
        x = gen_x[torch.randint(0, 8, (2,), generator=gen)]
        return x, torch.clamp(x + 0.1, -1, 1)

    fit = fit_palettes(model, 3, batch_fn, FitConfig(steps=5, lr=1e-3, warmup=1))
    assert fit.layers == 10 and len(fit.losses) == 5 and fit.losses[-1] < fit.losses[0]
    sd = model.state_dict()
    assert set(sd) == set(before)  # plain weights again, no parametrization left
    for k, w in sd.items():
        if w.dim() == 4:
            assert len(torch.unique(w.half())) <= 8
    art = Artifact.for_tinybeauty(model.config, sd)
    save_artifact(art, tmp_path / "fitted.pt")
    out = tmp_path / "fitted.mlpackage"
    r = export(tmp_path / "fitted.pt", out, weights="pal3")
    assert r.validation["weight_storage"]["palettized 3-bit"] == 10
    exact = decompressed_twin(out, load_model(tmp_path / "fitted.pt")).state_dict()
    for k, w in sd.items():
        if w.dim() == 4:  # the palette is the fitted values, rounded to fp16: nothing re-clustered
            assert torch.equal(exact[k], w.half().float())


def test_palettes_fitted_lowers_the_palette_error_and_leaves_the_input(small_artifact):
    model = load_model(small_artifact).module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(6, 3, SIZE, SIZE) * 2 - 1
    fitted, fit = palettes_fitted(model, 2, images, steps=40, lr=3e-3, seed=0)
    assert fit.steps == 40 and len(fit.losses) == 40 and fit.images == 6 and fit.layers == 10
    assert fit.error_after < fit.error_before  # fitting wins back part of what snapping cost
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # module in, module out
    for k, w in fitted.state_dict().items():
        if w.dim() == 4:
            assert len(torch.unique(w)) <= 4
    again, _ = palettes_fitted(model, 2, images, steps=40, lr=3e-3, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fitted.state_dict().items())


def test_fit_palettes_needs_palettes():
    with pytest.raises(UsageError, match="--fit-palettes"):
        ExportConfig(weights="int8", fit_palettes=10)
    with pytest.raises(UsageError, match="fit_data"):
        ExportConfig(weights="pal4", fit_data="photos")
    cfg = ExportConfig(format="mlprogram", weights="pal4", fit_palettes=300, seed=2, size=64)
    assert cfg.command_line("m.pt", "o.mlpackage") == ("tbopt export m.pt -o o.mlpackage --weights pal4 --size 64 "
                                                       "--fit-palettes 300 --seed 2")
    fitted_on = ExportConfig(format="mlprogram", weights="pal4", fit_palettes=30, fit_data="photos")
    assert fitted_on.command_line("m.pt") == "tbopt export m.pt --weights pal4 --fit-palettes 30 --calib photos"
    w8a8 = ExportConfig(format="mlprogram", weights="int4", block_size=16, activations="int8", calib="faces")
    assert w8a8.command_line("m.pt") == ("tbopt export m.pt --weights int4 --block-size 16 --activations int8 "
                                         "--calib faces")


def _stored(path):
    return {w.name: w.value for w in stored_weights(path)}


def test_cli_fit_palettes_is_recorded_and_rebuilds_the_same_weights(tmp_path, small_artifact):
    """The command the export prints (and records in the file) rebuilds the same weights; another seed does not."""
    out = tmp_path / "fitted.mlpackage"
    r = run("export", small_artifact, "-o", out, "--weights", "pal2", "--fit-palettes", 15, "--seed", 3,
            "--size", SIZE, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    fit = d["palette_fit"]
    assert fit["steps"] == 15 and fit["palette_error_before"] > 0 and fit["palette_error_after"] > 0
    assert "--fit-palettes 15" in d["command"] and "--seed 3" in d["command"] and "--weights pal2" in d["command"]
    history = json.loads(spec_of(out).description.metadata.userDefined["tbopt.history"])
    assert [h["step"] for h in history][-2:] == ["fit-palettes", "export"]
    assert history[-1]["command"] == history[-2]["command"] == d["command"]
    assert history[-2]["figures"]["palette_error_after"] == fit["palette_error_after"]

    args = shlex.split(d["command"])[1:]
    args[args.index("-o") + 1] = str(tmp_path / "again.mlpackage")
    assert run(*args, "--quiet").exit_code == 0
    first, again = _stored(out), _stored(tmp_path / "again.mlpackage")
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)

    r = run("export", small_artifact, "-o", tmp_path / "other.mlpackage", "--weights", "pal2", "--fit-palettes", 15,
            "--seed", 4, "--size", SIZE)
    assert r.exit_code == 0, r.stderr
    assert "rebuild" in r.stdout and "--seed 4" in r.stdout  # the table prints the command too
    other = _stored(tmp_path / "other.mlpackage")
    assert any(not np.array_equal(first[k], other[k]) for k in first)


# --- exports ---------------------------------------------------------------------------------------------


def test_neuralnetwork_fp16_export_for_ios13(tmp_path, small_artifact):
    out = tmp_path / "TinyBeauty.mlmodel"
    r = export(small_artifact, out)
    assert out.is_file() and r.format == "neuralnetwork" and r.target == "iOS13"
    spec = spec_of(out)
    assert spec.specificationVersion == 4  # iOS 13
    assert r.inputs == [{"name": "image", "type": "image", "color": "RGB", "shape": [SIZE, SIZE]}]
    assert r.outputs == [{"name": "made_up", "type": "image", "color": "RGB", "shape": [SIZE, SIZE]}]
    scaler = spec.neuralNetwork.preprocessing[0].scaler
    assert scaler.channelScale == pytest.approx(1 / 127.5) and scaler.redBias == -1  # the network sees [-1, 1]
    assert r.size_bytes == out.stat().st_size == r.graph_bytes + r.weight_bytes
    layers = spec.neuralNetwork.layers
    assert max(len(name) for layer in layers for name in [layer.name, *layer.output] if name != "made_up") <= 2
    assert [layer.WhichOneof("layer") for layer in layers].count("reduceMean") == 0  # lean LayerNorm
    assert 0 < r.zipped_bytes and r.casts == 0
    assert sum(r.validation["weight_storage"].values()) == len(load_model(small_artifact).artifact.state_dict)
    assert r.validation["fidelity_psnr_db"] > 60
    # metadata: author, licence, description, version, descriptions, tbopt's entries
    md = spec.description.metadata
    assert md.author and md.license and md.shortDescription and md.versionString == "1.0"
    assert "made-up face" in spec.description.output[0].shortDescription
    user = md.userDefined
    assert user["tbopt.source_sha256"] == load_model(small_artifact).sha256
    assert [h["step"] for h in json.loads(user["tbopt.history"])] == ["test-fixture", "export"]
    prep = json.loads(user["tbopt.preprocessing"])
    assert prep["size"] == SIZE and prep["output"] == "image" and prep["network_output"] == "residual"
    assert "compute" not in md.shortDescription  # the device picks a NeuralNetwork's precision
    assert user["tbopt.version"]


@pytest.mark.parametrize("out_name, weights, storage", [
    ("m.mlmodel", "int8", "linear 8-bit"),
    ("m.mlmodel", "pal4", "palettized 4-bit"),
    ("m.mlpackage", None, "fp16"),
    ("m.mlpackage", "int8", "int8 linear"),
    ("m.mlpackage", "pal4", "palettized 4-bit"),
    ("m.mlpackage", "pal3", "palettized 3-bit"),
])
def test_compressed_weights_are_what_the_file_holds(tmp_path, small_artifact, out_name, weights, storage):
    out = tmp_path / out_name
    r = export(small_artifact, out, weights=weights)
    loaded = load_model(small_artifact)
    convs = [k for k, v in loaded.artifact.state_dict.items() if v.dim() == 4]
    held = r.validation["weight_storage"]
    assert sum(held.values()) == len(loaded.artifact.state_dict)
    if weights is not None:
        assert held[storage] == len(convs)  # only convolution weights are compressed
    else:  # the fixture's LayerNorm betas are zeros: adding them is folded away
        assert set(held) <= {"fp16", "folded away (no-op)"}
    # the PyTorch model with the file's decompressed weights
    exact = decompressed_twin(out, loaded)
    sd = exact.state_dict()
    if weights and weights.startswith("pal"):
        bits = int(weights[3:])
        for k in convs:
            assert len(torch.unique(sd[k])) <= 2 ** bits
    if weights == "int8":
        for k in convs:  # per output channel: at most 256 levels
            assert all(len(torch.unique(channel)) <= 256 for channel in sd[k])
    held_values = [w.value for w in stored_weights(out)]
    for k in convs:  # exactly a tensor of the file
        assert any(v.size == sd[k].numel() and np.array_equal(v.reshape(sd[k].shape), sd[k].numpy())
                   for v in held_values)
    fid = r.validation["fidelity_psnr_db"]
    assert fid > {"int8": 40, "pal4": 25, "pal3": 20, None: 60}[weights]


def test_mlprogram_graph_is_compact(tmp_path, small_artifact):
    out = tmp_path / "m.mlpackage"
    r = export(small_artifact, out, weights="pal4")
    assert r.target == "iOS16"
    assert r.size_bytes == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert (out / "Data" / "com.apple.CoreML" / "model.mlmodel").stat().st_size == r.graph_bytes
    spec = spec_of(out)
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    names = [o.name for op in ops for o in op.outputs]
    assert len(set(names)) == len(names)
    assert max(len(n) for n in names if n not in ("image", "made_up")) <= 2  # short names
    consts = [op for op in ops if op.type == "const" and op.attributes["val"].WhichOneof("value") == "immediateValue"]
    values = [op.attributes["val"].SerializeToString(deterministic=True) + op.outputs[0].type.SerializeToString()
              for op in consts]
    assert len(set(values)) == len(values)  # identical constants are shared
    blobs = [op.type for op in ops for v in op.attributes.values() if v.WhichOneof("value") == "blobFileValue"]
    assert blobs == ["constexpr_lut_to_dense"] * 10  # only the conv weights' indices: small tensors are inline
    types = [op.type for op in ops]
    assert types.count("layer_norm") == 2 and "reduce_mean" not in types and "sqrt" not in types  # lean LayerNorm
    assert types.count("cast") == 2  # image in (fp32 -> fp16), image out: nothing else
    prog = load_program(out)  # reads back as a MIL program
    read_back = [op.op_type for op in prog.functions["main"].operations if op.op_type != "const"]
    assert read_back == [t for t in types if t != "const"]


def test_compaction_against_coremltools_defaults(small_artifact):
    """The same model as plain coremltools writes it: compaction shrinks its graph description."""
    ct = coremltools()
    model = load_model(small_artifact).module
    traced = torch.jit.trace(model, torch.zeros(1, 3, SIZE, SIZE))
    with quiet():
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 3, SIZE, SIZE))], convert_to="mlprogram",
                        minimum_deployment_target=ct.target.iOS15, skip_model_load=True)
    spec = ml.get_spec()
    result = compact_program(spec)
    assert result.shared_constants > 10 and result.bytes_after < 0.6 * result.bytes_before


def test_sparse_weights_of_a_pruned_checkpoint(tmp_path, sparse_artifact):
    r = export(sparse_artifact, tmp_path / "s.mlpackage")
    assert r.sparse and r.target == "iOS16" and r.zero_fraction == pytest.approx(0.6, abs=0.01)
    assert r.sparse_tensors > 0 and r.validation["weight_storage"]["sparse"] == r.sparse_tensors
    dense = export(sparse_artifact, tmp_path / "d.mlpackage", sparse="off")
    assert not dense.sparse and dense.weight_bytes > r.weight_bytes
    joint = export(sparse_artifact, tmp_path / "j.mlpackage", weights="pal4")
    assert joint.target == "iOS18" and joint.validation["weight_storage"]["sparse+palettized 4-bit"] > 0
    exact = decompressed_twin(tmp_path / "j.mlpackage", load_model(sparse_artifact))
    original = load_model(sparse_artifact).module
    for name, w in original.state_dict().items():  # zeros stay exactly zero
        if w.dim() == 4:
            assert torch.all(exact.state_dict()[name][w == 0] == 0)


def test_channel_pruned_tinybeauty_and_tensor_io(tmp_path, pruned_artifact):
    r = export(pruned_artifact, tmp_path / "p.mlpackage", weights="pal4", io="tensor")
    assert r.inputs == [{"name": "input", "type": "multiarray", "dtype": "float16", "shape": [1, 3, SIZE, SIZE]}]
    assert r.outputs[0]["name"] == "residual" and r.outputs[0]["shape"] == [1, 3, SIZE, SIZE]
    assert r.casts == 0  # fp16 arrays in and out on iOS16+
    r = export(pruned_artifact, tmp_path / "p.mlmodel", io="tensor", precision="fp32")
    assert r.outputs == [{"name": "residual", "type": "multiarray", "dtype": "float32", "shape": [1, 3, SIZE, SIZE]}]
    assert r.validation["fidelity_psnr_db"] > 90


def test_a_users_own_network_with_conv_transpose(tmp_path):
    from tests.archs import TinyUNet

    model = TinyUNet().eval()
    with torch.no_grad():
        model.enc1[1].running_mean.uniform_(-0.1, 0.1)
        model.enc1[1].running_var.uniform_(0.5, 2.0)
    src = tmp_path / "unet.pt"
    torch.save(model.state_dict(), src)
    for out, weights in (("u.mlmodel", "int8"), ("u.mlpackage", "pal6")):
        r = export_file(src, tmp_path / out, ExportConfig.for_output(out, weights=weights, size=SIZE),
                         arch="tests.archs:TinyUNet")
        assert r.validation["fidelity_psnr_db"] > 35, r.validation
        assert "TinyUNet" in spec_of(tmp_path / out).description.metadata.userDefined["tbopt.arch"]


# --- refusals: one line, nothing written ----------------------------------------------------------------------


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_int8_torchscript_is_refused_with_what_to_do(tmp_path):
    scripted = torch.jit.trace(small_tinybeauty(), torch.zeros(1, 3, SIZE, SIZE))
    src = tmp_path / "int8.pt"
    torch.jit.save(scripted, str(src), _extra_files={"tbopt.json": json.dumps({"quantized": True})})
    with pytest.raises(UnsupportedError) as err:
        export(src, tmp_path / "x.mlmodel")
    assert "--weights int8" in err.value.hint
    r = run("export", src, "-o", tmp_path / "x.mlmodel")
    assert_one_line_error(r, "int8 TorchScript")
    assert "--weights int8" in r.stderr
    assert not (tmp_path / "x.mlmodel").exists()


def test_a_core_ml_file_is_not_an_input(tmp_path, small_artifact):
    first = tmp_path / "m.mlpackage"
    export(small_artifact, first)
    assert_one_line_error(run("export", first, "-o", tmp_path / "again.mlmodel"), "already a Core ML model")


def test_existing_outputs_are_kept_without_force(tmp_path, small_artifact):
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export(small_artifact, out)
    assert (out / "keep.txt").read_text() == "mine"
    r = run("export", small_artifact, "-o", out, "--size", SIZE)
    assert_one_line_error(r, "already exists")
    r = export(small_artifact, out, force=True)
    assert not (out / "keep.txt").exists() and r.size_bytes > 0
    assert _leftovers(tmp_path) == []


def test_a_failure_leaves_nothing_behind(tmp_path, small_artifact, monkeypatch):
    import tinybeauty_cli.flow.export as export_flow

    def broken(*args, **kwargs):
        raise ExportError("simulated validation failure")

    monkeypatch.setattr(export_flow, "validate_export", broken)
    for name in ("m.mlpackage", "m.mlmodel"):
        with pytest.raises(ExportError):
            export(small_artifact, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("args, match, code", [
    (["-o", "{tmp}/m.onnx"], "cannot tell the Core ML format", 2),
    (["-o", "{tmp}/m.mlpackage", "--weights", "pal4", "--target", "iOS15"], "requires iOS16", 2),
    (["-o", "{tmp}/m.mlmodel", "--target", "iOS17"], "NeuralNetwork format", 2),
    (["-o", "{tmp}/m.mlmodel", "--fp32", "--weights", "fp16"], "--fp32", 2),
])
def test_cli_refusals(tmp_path, small_artifact, args, match, code):
    args = [a.format(tmp=tmp_path, src=small_artifact) for a in args]
    assert_one_line_error(run("export", small_artifact, *args), match, code=code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]


# --- the command -------------------------------------------------------------------------------------------------


def test_cli_json_and_table(tmp_path, small_artifact):
    out = tmp_path / "TinyBeauty.mlmodel"
    r = run("export", small_artifact, "--fp16", "-o", out, "--size", SIZE, "--json", "--author", "Ann",
            "--license", "MIT", "--model-version", "2.1")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "neuralnetwork" and d["target"] == "iOS13" and d["precision"] == "fp16"
    for key in ("size_bytes", "zipped_bytes", "graph_bytes", "weight_bytes", "seconds"):
        assert d[key] > 0
    assert d["validation"]["interface"] == "as promised"
    md = spec_of(out).description.metadata
    assert (md.author, md.license, md.versionString) == ("Ann", "MIT", "2.1")
    r = run("export", small_artifact, "-o", tmp_path / "t.mlpackage", "--weights", "int8", "--size", SIZE)
    assert r.exit_code == 0, r.stderr
    for words in ("ML Program", "iOS16", "int8 per-channel", "graph description", "weights fidelity", "passed"):
        assert words in r.stdout


def test_default_output_is_tinybeauty_mlmodel(tmp_path, small_artifact):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = run("export", small_artifact, "--size", SIZE, "--quiet")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "TinyBeauty.mlmodel").is_file()


# --- the released checkpoint: every format and compression -------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("out_name", ["m.mlmodel", "m.mlpackage"])
@pytest.mark.parametrize("weights", [None, "int8", "pal8", "pal6", "pal4", "pal3", "pal2"])
def test_released_checkpoint_in_every_format_and_compression(tmp_path, realdata, out_name, weights):
    out = tmp_path / out_name
    r = export_file(REAL_CKPT, out, ExportConfig.for_output(out, weights=weights))
    assert r.parameters == 85_227 and r.size == 256
    floor = {None: 80, "int8": 50, "pal8": 50, "pal6": 40, "pal4": 35, "pal3": 30, "pal2": 25}[weights]
    assert r.validation["fidelity_psnr_db"] > floor, r.validation
    if out_name == "m.mlmodel" and weights == "int8":
        assert r.size_bytes < 100_000
