"""Exact graph rewrites behind the fast int8 model: same outputs, other shapes, edge cases."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinybeauty_cli.core.model import LayerNorm, TinyBeauty, TinyBeautyConfig
from tinybeauty_cli.quantize.fx_passes import FloatBoundary, isolate_list_inputs
from tinybeauty_cli.quantize.graph_rewrites import (
    ChannelInstanceNorm,
    FastLayerNorm,
    SigmoidTanh,
    SubPixelConv2d,
    fidelity_db,
    optimize_graph,
    quantizable_layers,
    trace,
)

from tests.archs import TinyUNet
from tests.helpers import small_tinybeauty


@pytest.mark.filterwarnings("ignore:The TorchScript type system")  # model.py's annotated `self.norm: ... | None`
def test_tinybeauty_rewrites_are_exact_at_other_batch_sizes_and_resolutions():
    model = small_tinybeauty()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    gm, report = optimize_graph(model, x)
    assert report.skipped is None and report.fidelity_db >= 100
    assert len(report.applied) == 4  # instance norms, layer norms, sub-pixel convs, tanh
    assert isinstance(gm.get_submodule("out.activation"), SigmoidTanh)
    assert report.subpixel_layers == {"upconv1.conv": "upconv1.conv.conv", "upconv2.conv": "upconv2.conv.conv"}
    assert isinstance(gm.get_submodule("upconv2.conv"), SubPixelConv2d)
    assert isinstance(gm.get_submodule("content_encoder.conv_first.norm"), ChannelInstanceNorm)
    assert isinstance(gm.get_submodule("upconv1.norm"), FastLayerNorm)
    # the upsample modules are gone from the graph
    assert not any(n.op == "call_module" and n.target in ("up1", "up2") for n in gm.graph.nodes)
    with torch.no_grad():
        for shape in [(3, 3, 64, 96), (1, 3, 32, 32)]:
            y = torch.rand(*shape) * 2 - 1
            assert fidelity_db(gm(y), model(y)) > 100
            assert fidelity_db(gm(y.contiguous(memory_format=torch.channels_last)), model(y)) > 100
    scripted = torch.jit.script(gm)
    with torch.no_grad():
        assert fidelity_db(scripted(x), model(x)) > 100


def test_rewrites_on_a_channel_pruned_tinybeauty():
    cfg = TinyBeautyConfig(n_res=1, first=5, down1=7, stream=6, res_hidden=(3, 4), up1=9, up2=4)
    torch.manual_seed(1)
    model = TinyBeauty(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    gm, report = optimize_graph(model, x)
    assert report.fidelity_db > 100 and len(report.applied) == 4


@pytest.mark.parametrize("pad", ["reflect", "zeros-module", "zeros-conv", "replicate"])
def test_subpixel_conv_matches_upsample_pad_conv(pad):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, padding=1 if pad == "zeros-conv" else 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = {"reflect": nn.ReflectionPad2d(1), "zeros-module": nn.ZeroPad2d(1),
                        "zeros-conv": None, "replicate": nn.ReplicationPad2d(1)}[pad]
            self.conv = conv

        def forward(self, x):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x if self.pad is None else self.pad(x))

    net = Net().eval()
    x = torch.randn(2, 5, 7, 9)
    gm, report = optimize_graph(net, x)
    assert report.subpixel_layers == {"conv": "conv.conv"}
    with torch.no_grad():
        assert torch.allclose(gm(x), net(x), atol=1e-5)


def test_patterns_that_must_not_be_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")  # not nearest
            self.a = nn.Conv2d(3, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 3, 3, stride=2, padding=1)  # strided
            self.norm = nn.InstanceNorm2d(3, track_running_stats=True)  # uses running statistics

        def forward(self, x):
            return self.norm(self.b(F.interpolate(self.a(self.up(x)), scale_factor=2)))

    net = Net().eval()
    gm, report = optimize_graph(net, torch.randn(1, 3, 8, 8))
    assert report.applied == [] and report.subpixel_layers == {}


def test_fast_layer_norm_matches_munit_layer_norm_including_a_constant_input():
    torch.manual_seed(0)
    ln = LayerNorm(6)
    fast = FastLayerNorm(ln)
    x = torch.randn(3, 6, 10, 12) * 3 + 2
    assert torch.allclose(fast(x), ln(x), atol=1e-5)
    # a constant input has std 0: both give ~beta (the original divides rounding noise by eps)
    const = torch.full((1, 6, 4, 4), 0.7)
    out = fast(const)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ln.beta.view(1, -1, 1, 1).expand_as(out), atol=0.05)


def test_channel_instance_norm_matches_instance_norm_with_and_without_affine():
    x = torch.randn(2, 4, 9, 9) * 2 + 1
    for affine in (False, True):
        norm = nn.InstanceNorm2d(4, affine=affine)
        if affine:
            with torch.no_grad():
                norm.weight.uniform_(0.5, 2)
                norm.bias.uniform_(-1, 1)
        assert torch.allclose(ChannelInstanceNorm.from_instance_norm(norm)(x), norm(x), atol=1e-5)


def test_float_boundaries_on_cat_inputs_and_quantizable_layers():
    net = TinyUNet(4).eval()
    gm = trace(net)
    assert isolate_list_inputs(gm) == 2
    assert sum(isinstance(m, FloatBoundary) for m in gm.modules()) == 2
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))
    assert quantizable_layers(net) == ["enc1.0", "enc2.0", "mid.0", "up", "dec.0", "head"]


@pytest.mark.filterwarnings("ignore:The TorchScript type system")
def test_equalized_channel_ranges_keep_the_function_and_even_out_the_ranges():
    model = small_tinybeauty()
    with torch.no_grad():  # make channel ranges very unequal, as in trained models
        model.upconv2.conv.weight[:4].mul_(20)
        model.content_encoder.down1.conv.weight.mul_(300)  # variances >> the norm's eps, as when trained
        model.content_encoder.down1.conv.weight[:2].mul_(0.3)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    before = model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    gm, report = optimize_graph(model, images[:2], images=images)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert report.fidelity_db > 100 and any("equal ranges" in a for a in report.applied)
    assert report.equalized["upconv2.conv"] > 10 and report.equalized["content_encoder.down1.conv"] > 2
    assert "out.conv" not in report.equalized  # followed by tanh: scaling would not be free
    ranges = {}
    conv = gm.get_submodule("content_encoder.down1.conv")
    def record(_m, _i, o):
        ranges["down1"] = o.amax((0, 2, 3)) - o.amin((0, 2, 3))

    hook = conv.register_forward_hook(record)
    with torch.no_grad():
        gm(images)
    hook.remove()
    r = ranges["down1"]
    assert float(r.max() / r.min()) < 1.01
    scripted = torch.jit.script(gm)
    with torch.no_grad():
        y = torch.rand(3, 3, 48, 40) * 2 - 1
        assert fidelity_db(scripted(y), model(y)) > 100


def test_sigmoid_tanh_is_tanh_within_float_rounding():
    x = torch.linspace(-12, 12, 20001)
    assert (SigmoidTanh()(x) - torch.tanh(x)).abs().max() < 3e-7
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh()))
    gm = torch.fx.GraphModule(gm, gm.graph)
    from tinybeauty_cli.quantize.graph_rewrites import RewriteReport, _rewrite_tanh

    report = RewriteReport()
    _rewrite_tanh(gm, report)
    assert isinstance(gm.get_submodule("1"), SigmoidTanh) and report.applied == ["1 tanh -> 2 * sigmoid(2x) - 1 (vectorised on CPU)"]


def test_lean_int8_convs_compute_the_same_as_the_converted_modules():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from tinybeauty_cli.core.contexts import quantized_engine
    from tinybeauty_cli.quantize.fx_passes import PackedConv2d, lean_quantized_convs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with quantized_engine("x86"):
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        converted = convert_fx(prepared)
        want = converted(x)
        lean = lean_quantized_convs(converted)
        assert [type(m) for m in lean.modules()].count(PackedConv2d) == 2
        assert torch.equal(lean(x), want)
        scripted = torch.jit.script(lean)
        assert "Input shape" not in scripted.code and torch.equal(scripted(x), want)
