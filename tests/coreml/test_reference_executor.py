"""The Core ML reference executor against PyTorch, on models made with coremltools itself."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.archs import TinyUNet
from tests.helpers import COREML_SIZE as SIZE, small_tinybeauty
from tests.coreml_helpers import conv_weights, with_file_weights, save_mil_program
from tests.coreml_models import MLPROGRAM_VARIANTS, NEURALNETWORK_VARIANTS, CoreMLZoo, OpZoo, convert, fold_batchnorm
from tinybeauty_cli.core.errors import InputError, TbOptError, UnsupportedError
from tinybeauty_cli.core.images import model_to_uint8
from tinybeauty_cli.core.quality import fidelity_psnr_db
from tinybeauty_cli.coreml import runner as cr
from tinybeauty_cli.coreml.exec import mil_ops, nn_layers
from tinybeauty_cli.coreml.spec import coremltools
from tinybeauty_cli.runtime.runners import open_runner

#: The fidelity bars: fp32 export vs PyTorch; fp16 export vs PyTorch; compressed vs its PyTorch twin.
FP32_DB, FP16_DB, COMPRESSED_DB = 90.0, 60.0, 60.0


@pytest.fixture(scope="session")
def unet_zoo(tmp_path_factory) -> CoreMLZoo:
    torch.manual_seed(4)
    net = TinyUNet(width=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded as the converter would
        net.enc1[1].running_mean.uniform_(-0.3, 0.3)
        net.enc1[1].running_var.uniform_(0.5, 2.0)
        net.head.weight.mul_(0.2)
    return CoreMLZoo(tmp_path_factory.mktemp("coreml_unet"), fold_batchnorm(net), SIZE)


def torch_predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The made-up images a residual network gives, in float, one image at a time."""
    with torch.inference_mode():
        r = np.concatenate([model(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    return np.clip(x + r, -1.0, 1.0)


def reference_for(zoo: CoreMLZoo, name: str, path: Path) -> tuple[torch.nn.Module, float]:
    """The PyTorch model an export must match, and the bar: the original for fp32/fp16 weights,
    the original carrying the file's decompressed conv weights for compressed ones."""
    weights = name.split("/")[2]
    if weights == "fp32":
        return zoo.model, FP32_DB
    if weights == "fp16":
        return zoo.model, FP16_DB
    twin = with_file_weights(copy.deepcopy(zoo.model), path, zoo.size)
    return twin, COMPRESSED_DB


def fidelity(zoo: CoreMLZoo, name: str, x: np.ndarray, **options) -> tuple[float, float]:
    path = zoo.path(name)
    runner = cr.open_coreml_runner(path, round_image_output=False, use_device=False, **options)
    ref, bar = reference_for(zoo, name, path)
    return fidelity_psnr_db(runner.predict(x), torch_predict(ref, x)), bar


# ---------------------------------------------------------------- the fidelity bars

#: Variants checked in the default run (every decompression op, both formats and I/O modes);
#: the rest of the matrix runs with ``-m slow``.
QUICK = ["mlprogram/tensor/fp32", "mlprogram/tensor/fp16", "mlprogram/tensor/int8", "mlprogram/tensor/pal4",
         "mlprogram/tensor/sparse", "mlprogram/tensor/sparse-pal4", "mlprogram/image/fp16",
         "neuralnetwork/tensor/fp32", "neuralnetwork/tensor/fp16", "neuralnetwork/tensor/int8",
         "neuralnetwork/tensor/lut4", "neuralnetwork/image/int8"]


def matrix(quick: list[str], every: list[str]) -> list:
    return [n if n in quick else pytest.param(n, marks=pytest.mark.slow) for n in every]


@pytest.mark.parametrize("name", matrix(QUICK, MLPROGRAM_VARIANTS + NEURALNETWORK_VARIANTS))
def test_tinybeauty_exports_match_pytorch(tb_zoo, inputs, name):
    db, bar = fidelity(tb_zoo, name, inputs)
    assert db >= bar, f"{name}: {db:.1f} dB < {bar} dB"


UNET_QUICK = ["mlprogram/tensor/fp16", "mlprogram/tensor/int8", "neuralnetwork/tensor/fp32",
              "neuralnetwork/tensor/lut4"]


@pytest.mark.parametrize("name", matrix(UNET_QUICK, MLPROGRAM_VARIANTS + NEURALNETWORK_VARIANTS))
def test_convtranspose_unet_exports_match_pytorch(unet_zoo, inputs, name):
    db, bar = fidelity(unet_zoo, name, inputs)
    assert db >= bar, f"{name}: {db:.1f} dB < {bar} dB"


def test_compressed_weights_are_really_compressed(tb_zoo):
    """The twins are not the original model: the decompressed weights differ from it."""
    original = [m.weight.detach().numpy() for m in tb_zoo.model.modules() if isinstance(m, torch.nn.Conv2d)]
    for name, distinct in (("mlprogram/tensor/pal2", 4), ("neuralnetwork/tensor/lut4", 16)):
        weights = conv_weights(tb_zoo.path(name))
        assert len(weights) == len(original)
        assert all(len(np.unique(w.weight)) <= distinct for w in weights)
    sparse = conv_weights(tb_zoo.path("mlprogram/tensor/sparse"))
    assert np.mean([np.mean(w.weight == 0) for w in sparse]) == pytest.approx(0.5, abs=0.05)


def test_fp16_emulation_rounds_after_every_op(tb_zoo, inputs):
    fp16 = tb_zoo.path("mlprogram/tensor/fp16")
    plain = cr.open_coreml_runner(fp16, use_device=False)
    emulated = cr.open_coreml_runner(fp16, use_device=False, fp16_emulation=True)
    assert "fp16 rounding" in emulated.engine and "fp16" not in plain.engine.split(",")[-1]
    a, b = plain.residual(inputs), emulated.residual(inputs)
    assert not np.array_equal(a, b)
    ref = torch_predict(tb_zoo.model, inputs)
    # rounding costs fidelity, but stays a faithful fp16 computation
    assert 45.0 < fidelity_psnr_db(emulated.predict(inputs), ref) < fidelity_psnr_db(plain.predict(inputs), ref)
    # every op of this fp16 program rounds its output; the raw output is therefore fp16 numbers
    steps = emulated.backend.executor.graph.steps
    assert steps and all(s.rounded for s in steps)
    assert not any(s.rounded for s in plain.backend.executor.graph.steps)
    raw = emulated.backend.executor.run({"x": torch.from_numpy(inputs[:1])})["residual"].numpy()
    assert np.array_equal(raw.astype(np.float16).astype(np.float32), raw)
    fp32 = cr.open_coreml_runner(tb_zoo.path("mlprogram/tensor/fp32"), use_device=False, fp16_emulation=True)
    assert any("computes in fp32" in n for n in fp32.notes)


def test_image_io_is_8_bit_like_core_ml(tb_zoo, inputs):
    """Core ML hands 8-bit pixels in and stores the image output in 8 bits."""
    path = tb_zoo.path("mlprogram/image/fp16")
    runner = cr.open_coreml_runner(path, use_device=False)
    assert runner.preprocessing.output == "image" and runner.model.input.kind == "image"
    made = runner.predict(inputs)
    grid = model_to_uint8(made).transpose(0, 3, 1, 2) / 127.5 - 1.0
    assert np.allclose(made, grid, rtol=0, atol=1e-6)  # on the 8-bit grid
    want = model_to_uint8(torch_predict(tb_zoo.model, inputs))
    got = model_to_uint8(made)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.mean(got == want) > 0.99


@pytest.mark.parametrize("program", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["mlprogram", "neuralnetwork"])
def test_bgr_image_models_and_per_channel_bias(tmp_path, inputs, program):
    """Channel order and the scaler's per-channel bias, as a BGR app would see them."""
    model = small_tinybeauty(seed=5, dim=8, n_res=1)
    bias = (-1.0, -0.75, -1.25)  # red, green, blue
    scale = torch.tensor([1 / 127.5] * 3).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.rint((inputs + 1.0) * 127.5).astype(np.float32))
    bgr = pixels.flip(1)
    net_in = bgr * scale + torch.tensor(bias[::-1]).view(1, 3, 1, 1)  # what the network sees, B G R
    with torch.inference_mode():
        out_bgr = (torch.clamp(net_in + model(net_in), -1, 1) + 1) * 127.5
    want = out_bgr.flip(1).numpy() / 127.5 - 1.0
    ml = convert(model, SIZE, program=program, precision="fp32", image_io=True, bgr=True, bias=bias)
    path = tmp_path / ("bgr.mlpackage" if program else "bgr.mlmodel")
    ml.save(str(path))
    runner = cr.open_coreml_runner(path, round_image_output=False, use_device=False)
    assert runner.model.input.color == "BGR" and runner.model.output.color == "BGR"
    assert fidelity_psnr_db(runner.predict(inputs), want) >= FP32_DB


@pytest.mark.parametrize("program", [True, False], ids=["mlprogram", "neuralnetwork"])
def test_more_ops_and_layers_match_pytorch(tmp_path, inputs, program):
    torch.manual_seed(6)
    model = OpZoo(size=SIZE).eval()
    ml = convert(model, SIZE, program=program, precision="fp32")
    path = tmp_path / ("zoo.mlpackage" if program else "zoo.mlmodel")
    ml.save(str(path))
    runner = cr.open_coreml_runner(path, use_device=False)
    assert fidelity_psnr_db(runner.predict(inputs), torch_predict(model, inputs)) >= FP32_DB


# ---------------------------------------------------------------- a wrong executor is caught

def _swapped_concat(op, c):
    axis = int(c.param("axis"))
    return (lambda *xs: torch.cat(xs[::-1], dim=axis)), list(op.values)


def _nn_swapped_concat(layer, p):
    return (lambda *xs: torch.cat(xs[::-1], dim=-3)), list(layer.input)


def _nn_conv_without_bias(layer, p):
    q = type(p)()
    q.CopyFrom(p)
    q.hasBias = False
    return _nn_conv_without_bias.real(layer, q)


@pytest.mark.parametrize("fmt", ["mlprogram", "neuralnetwork"])
@pytest.mark.parametrize("mistake", ["swapped concat order", "missing conv bias"])
def test_a_wrong_executor_fails_the_comparison(tb_zoo, inputs, monkeypatch, fmt, mistake):
    name = f"{fmt}/tensor/fp32"
    good, bar = fidelity(tb_zoo, name, inputs)
    assert good >= bar
    if fmt == "mlprogram":
        real_conv = mil_ops.OPS["conv"]
        if mistake == "swapped concat order":
            monkeypatch.setitem(mil_ops.OPS, "concat", _swapped_concat)
        else:
            def conv_without_bias(op, c):
                real = c.tensor
                c.tensor = lambda n: None if n == "bias" else real(n)
                return real_conv(op, c)
            monkeypatch.setitem(mil_ops.OPS, "conv", conv_without_bias)
    else:
        if mistake == "swapped concat order":
            monkeypatch.setitem(nn_layers.LAYERS, "concat", _nn_swapped_concat)
        else:
            _nn_conv_without_bias.real = nn_layers.LAYERS["convolution"]
            monkeypatch.setitem(nn_layers.LAYERS, "convolution", _nn_conv_without_bias)
    bad, _ = fidelity(tb_zoo, name, inputs)
    assert bad < FP16_DB < bar <= good, f"{mistake}: {bad:.1f} dB"


# ---------------------------------------------------------------- unknown ops, bad files

def test_an_unknown_mil_op_is_named(tmp_path):
    path = save_mil_program(tmp_path, lambda mb, x: mb.cumsum(x=x, axis=1))
    with pytest.raises(UnsupportedError, match="cumsum"):
        open_runner(path)


def test_an_unknown_neuralnetwork_layer_is_named(tmp_path):
    ct = coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    shape = (1, 3, SIZE, SIZE)
    builder = NeuralNetworkBuilder([("x", datatypes.Array(*shape))], [("y", datatypes.Array(*shape))],
                                   disable_rank5_shape_mapping=True)
    builder.add_lrn("norm", "x", "y", alpha=1e-4, beta=0.75, local_size=3)
    path = tmp_path / "lrn.mlmodel"
    ct.models.MLModel(builder.spec).save(str(path))
    with pytest.raises(UnsupportedError, match="lrn"):
        open_runner(path)


def test_neuralnetwork_layers_written_by_hand(tmp_path, inputs):
    """Layers coremltools' converter does not emit but a compact exporter may: a rank-preserving
    reshape (0 = keep the axis, -1 = infer) around an instance norm, and an inference batchnorm."""
    ct = coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    shape = (1, 3, SIZE, SIZE)
    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.2, 0.2, 3)
    builder = NeuralNetworkBuilder([("x", datatypes.Array(*shape))], [("y", datatypes.Array(*shape))],
                                   disable_rank5_shape_mapping=True)
    builder.add_rank_preserving_reshape("r1", "x", "flat", [0, 1, -1, SIZE])
    builder.add_batchnorm("ln", 1, np.ones(1), np.zeros(1), input_name="flat", output_name="normed",
                          compute_mean_var=True, instance_normalization=True, epsilon=1e-5)
    builder.add_rank_preserving_reshape("r2", "normed", "back", [-1, 3, SIZE, 0])
    builder.add_batchnorm("affine", 3, gamma, beta, np.zeros(3), np.ones(3), input_name="back", output_name="y",
                          epsilon=0.0)
    path = tmp_path / "layers.mlmodel"
    ct.models.MLModel(builder.spec).save(str(path))
    runner = cr.open_coreml_runner(path, use_device=False)
    x = torch.from_numpy(inputs)
    flat = x.reshape(len(x), 1, -1, SIZE)
    y = torch.nn.functional.instance_norm(flat, eps=1e-5).reshape(x.shape)
    want = y * torch.tensor(gamma, dtype=torch.float32).view(1, 3, 1, 1) + torch.tensor(beta, dtype=torch.float32).view(1, 3, 1, 1)
    assert fidelity_psnr_db(runner.residual(inputs), want.numpy()) >= FP32_DB


def test_a_variant_the_executor_cannot_pin_down_is_refused(tmp_path):
    """conv_transpose with 'same' padding: where Core ML puts an odd crop is not documented."""
    def body(mb, x):
        w = np.random.default_rng(0).normal(size=(3, 3, 3, 3)).astype(np.float32)
        y = mb.conv_transpose(x=x, weight=w, strides=[2, 2], pad_type="same")
        return mb.avg_pool(x=y, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid")
    path = save_mil_program(tmp_path, body)
    with pytest.raises(UnsupportedError, match="conv_transpose.*same"):
        open_runner(path)


def test_mil_ops_without_a_torch_frontend_path(tmp_path, inputs):
    """Ops the exporter may write directly: 'same' conv padding, a layer_norm over (C, H, W),
    rsqrt/inverse with epsilon, constant concat operands -- against PyTorch written by hand."""
    rng = np.random.default_rng(1)
    w = rng.normal(scale=0.2, size=(3, 3, 4, 4)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, size=(3, SIZE, SIZE)).astype(np.float32)

    def body(mb, x):
        y = mb.conv(x=x, weight=w, pad_type="same", strides=[1, 1])  # even kernel: asymmetric pad
        y = mb.layer_norm(x=y, axes=[1, 2, 3], gamma=gamma, epsilon=1e-5)
        y = mb.mul(x=y, y=mb.rsqrt(x=mb.add(x=mb.mul(x=y, y=y), y=1.0), epsilon=1e-3))
        z = mb.concat(values=[y, np.ones((1, 1, SIZE, SIZE), np.float32)], axis=1)
        z = mb.reduce_sum(x=z, axes=[1], keep_dims=True)
        return mb.sub(x=mb.tanh(x=mb.inverse(x=mb.add(x=mb.abs(x=z), y=1.0), epsilon=1e-4)), y=y)
    path = save_mil_program(tmp_path, body)
    runner = cr.open_coreml_runner(path, use_device=False)
    x = torch.from_numpy(inputs)
    f = torch.nn.functional
    y = f.conv2d(f.pad(x, (1, 2, 1, 2)), torch.from_numpy(w))
    y = f.layer_norm(y, (3, SIZE, SIZE), torch.from_numpy(gamma), None, 1e-5)
    y = y * torch.rsqrt(y * y + 1.0 + 1e-3)
    z = torch.cat([y, torch.ones(len(x), 1, SIZE, SIZE)], 1).sum(1, keepdim=True)
    want = torch.tanh(1.0 / (z.abs() + 1.0 + 1e-4)) - y
    assert fidelity_psnr_db(runner.residual(inputs), want.numpy()) >= FP32_DB


def test_unpack_bits_matches_coremltools():
    from coremltools.models.neural_network.quantization_utils import (
        _convert_array_to_nbit_quantized_bytes,
        _unpack_to_bytes,
    )
    rng = np.random.default_rng(2)
    for nbits in (1, 2, 3, 4, 6, 7, 8):
        values = rng.integers(0, 1 << nbits, size=101).astype(np.uint8)
        packed = values.tobytes() if nbits == 8 else _convert_array_to_nbit_quantized_bytes(values, nbits).tobytes()
        ours = nn_layers.unpack_bits(packed, values.size, nbits)
        assert np.array_equal(ours, values)
        if nbits < 8:
            assert np.array_equal(ours, _unpack_to_bytes(np.frombuffer(packed, np.uint8), values.size, nbits))


def test_bad_core_ml_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.mlmodel"
    junk.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(InputError, match="cannot read Core ML model"):
        open_runner(junk)
    with pytest.raises(InputError, match="does not exist"):
        open_runner(tmp_path / "missing.mlpackage")
    (tmp_path / "empty.mlpackage").mkdir()
    with pytest.raises(InputError, match="cannot read Core ML model"):
        open_runner(tmp_path / "empty.mlpackage")
    with pytest.raises(InputError, match="not a folder"):
        (tmp_path / "file.mlpackage").write_bytes(b"x")
        open_runner(tmp_path / "file.mlpackage")


def test_one_set_of_options_serves_a_mix_of_files(tb_zoo, small_artifact):
    """Checkpoint options are ignored by Core ML openers and Core ML options by checkpoints,
    so ``bench a.pt b.mlpackage --compute-units cpu --arch ...`` works; bad values still fail."""
    options = dict(compute_units="cpu", fp16_emulation=True, arch=None, arch_kwargs=None, trust_pickle=False)
    assert open_runner(small_artifact, **options).kind == "float"
    assert open_runner(tb_zoo.path("mlprogram/tensor/fp16"), **{**options, "arch": "tests.archs:TinyUNet"}).kind == "coreml"
    with pytest.raises(TbOptError, match="compute units must be one of"):
        open_runner(tb_zoo.path("mlprogram/tensor/fp16"), compute_units="gpu")


def test_runner_interface(tb_zoo, inputs):
    runner = open_runner(tb_zoo.path("neuralnetwork/tensor/fp16"))
    assert runner.kind == "coreml" and runner.engine.startswith(cr.REFERENCE_ENGINE)
    assert runner.size == SIZE and runner.preprocessing.output == "residual"
    out = runner.predict_all(np.concatenate([inputs] * 3))  # more than one batch of 8
    assert out.shape == (9, 3, SIZE, SIZE) and out.dtype == np.float32
    assert np.array_equal(out[:3], runner.predict(inputs))
    with pytest.raises(InputError, match="takes \\(N, 3, 32, 32\\)"):
        runner.residual(np.zeros((1, 3, 16, 16), np.float32))
    info = runner.info()
    assert info["format"] == "NeuralNetwork (.mlmodel)" and "fp16 x" in info["coreml_weights"]
    assert "convolution" in info["coreml_ops"]


def test_info_on_a_compressed_program(tb_zoo):
    info = open_runner(tb_zoo.path("mlprogram/tensor/sparse-pal4")).info()
    assert info["target"].startswith("iOS18")
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in tb_zoo.model.modules())
    assert info["coreml_weights"] == f"constexpr_lut_to_sparse+constexpr_sparse_to_dense x{n_convs}"
    assert info["precision"] == "fp16"
    assert "non-zero" in info["coreml_stored_values"]


def test_tbopt_metadata_sets_preprocessing(tmp_path):
    ml = convert(small_tinybeauty(dim=8, n_res=1), SIZE, program=True, precision="fp32")
    ml.user_defined_metadata["tbopt.preprocessing"] = '{"size": 32, "value_range": [-1, 1], "output": "image"}'
    ml.user_defined_metadata["tbopt.history"] = '[{"step": "export"}]'
    path = tmp_path / "meta.mlpackage"
    ml.save(str(path))
    runner = open_runner(path)
    assert runner.preprocessing.output == "image"  # the tensor output is read as the made-up image
    assert runner.info()["history"] == [{"step": "export"}]


# Core ML itself (macOS), and a stand-in for it on any OS: tests/coreml/test_device.py


# ---------------------------------------------------------------- the released checkpoint

REAL_QUICK = ["mlprogram/tensor/fp32", "mlprogram/tensor/fp16", "mlprogram/tensor/pal4",
              "neuralnetwork/tensor/fp16", "neuralnetwork/tensor/lut4"]


@pytest.mark.realdata
@pytest.mark.parametrize("name", matrix(REAL_QUICK, MLPROGRAM_VARIANTS + NEURALNETWORK_VARIANTS))
def test_released_checkpoint_exports_match_pytorch(real_zoo, real_inputs, name):
    db, bar = fidelity(real_zoo, name, real_inputs)
    assert db >= bar, f"{name}: {db:.1f} dB < {bar} dB"
