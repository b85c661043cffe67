"""Core ML test models, made with coremltools directly (trace, ct.convert, compress).

They cover what tbopt's exporter produces -- ML Programs in fp32/fp16 with int8, palettized,
sparse and joint sparse+palettized weights; NeuralNetworks with fp16, int8-linear and LUT
weights; tensor I/O returning the residual and image I/O returning
``(clamp(x + r, -1, 1) + 1) * 127.5`` -- without depending on the exporter's own code.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tinybeauty_cli.coreml.spec import coremltools


class ImageOut(nn.Module):
    """A residual network wrapped to return the made-up image in 0..255, as image-I/O exports do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(x + self.net(x), -1.0, 1.0) + 1.0) * 127.5


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each Conv2d -> BatchNorm2d pair of a Sequential (Core ML converters do the same)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return model


def convert(model: nn.Module, size: int, *, program: bool = True, precision: str = "fp16",
            image_io: bool = False, target: str = "iOS16", bgr: bool = False,
            bias: tuple[float, float, float] = (-1.0, -1.0, -1.0)) -> object:
    """Trace ``model`` at ``size`` and convert it (ML Program or NeuralNetwork)."""
    ct = coremltools()
    net = ImageOut(model) if image_io else model
    x = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net.eval(), x)
    layout = ct.colorlayout.BGR if bgr else ct.colorlayout.RGB
    if image_io:
        # the converter wants the bias in the image's channel order
        inputs = [ct.ImageType(name="image", shape=x.shape, scale=1 / 127.5, color_layout=layout,
                               bias=list(bias[::-1]) if bgr else list(bias))]
        outputs = [ct.ImageType(name="made_up", color_layout=layout)]
    else:
        inputs = [ct.TensorType(name="x", shape=x.shape)]
        outputs = [ct.TensorType(name="residual")]
    kwargs: dict = {}
    if program:
        kwargs["compute_precision"] = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
        kwargs["minimum_deployment_target"] = getattr(ct.target, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        return ct.convert(traced, inputs=inputs, outputs=outputs,
                          convert_to="mlprogram" if program else "neuralnetwork", **kwargs)


def compress_program(mlmodel: object, kind: str) -> object:
    """``coremltools.optimize.coreml`` compressions with ``weight_threshold=0`` (tiny models)."""
    import coremltools.optimize.coreml as cto

    def config(op_config: object) -> object:
        return cto.OptimizationConfig(global_config=op_config)

    if kind == "int8":
        return cto.linear_quantize_weights(mlmodel, config(cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", weight_threshold=0)))
    if kind == "int8-affine":
        return cto.linear_quantize_weights(mlmodel, config(cto.OpLinearQuantizerConfig(
            mode="linear", weight_threshold=0)))
    if kind == "int4-block":
        return cto.linear_quantize_weights(mlmodel, config(cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=8, weight_threshold=0)))
    if kind.startswith("pal"):
        return cto.palettize_weights(mlmodel, config(cto.OpPalettizerConfig(
            nbits=int(kind[3:]), mode="kmeans", weight_threshold=0)))
    if kind == "sparse":
        return cto.prune_weights(mlmodel, config(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)))
    if kind.startswith("sparse-pal"):
        sparse = compress_program(mlmodel, "sparse")
        return cto.palettize_weights(sparse, config(cto.OpPalettizerConfig(
            nbits=int(kind[len("sparse-pal"):]), mode="kmeans", weight_threshold=0)), joint_compression=True)
    raise ValueError(kind)


def _kmeans_lut(nbits: int, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coremltools' own k-means LUT, flattened (its ``kmeans`` mode trips over numpy 2)."""
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    lut, wq = _get_kmeans_lookup_table_and_weight(nbits, weight)
    return lut.reshape(-1), wq


def compress_network(mlmodel: object, kind: str) -> object:
    """``neural_network.quantization_utils.quantize_weights``: fp16, int8 linear, k-means / linear LUTs."""
    import contextlib
    import io

    from coremltools.models.neural_network import quantization_utils as qu

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per layer
        if kind == "fp16":
            return qu.quantize_weights(mlmodel, nbits=16)
        if kind == "int8":
            return qu.quantize_weights(mlmodel, nbits=8, quantization_mode="linear")
        if kind == "int8-symmetric":
            return qu.quantize_weights(mlmodel, nbits=8, quantization_mode="linear_symmetric")
        if kind.startswith("lut"):
            return qu.quantize_weights(mlmodel, nbits=int(kind[3:]), quantization_mode="custom_lut",
                                       lut_function=_kmeans_lut)
        if kind.startswith("linlut"):
            return qu.quantize_weights(mlmodel, nbits=int(kind[6:]), quantization_mode="linear_lut")
    raise ValueError(kind)


@dataclass
class Variant:
    """One test model: how to build it, and what it should match."""

    name: str
    build: Callable[[], object]
    suffix: str
    compressed: bool = False
    fp16: bool = False
    image_io: bool = False


class CoreMLZoo:
    """Core ML files built on first use and cached for the session."""

    def __init__(self, folder: Path, model: nn.Module, size: int):
        self.folder = folder
        self.model = model.eval()
        self.size = size
        self._bases: dict[tuple, object] = {}
        self._paths: dict[str, Path] = {}

    def base(self, **kwargs: object) -> object:
        key = tuple(sorted(kwargs.items()))
        if key not in self._bases:
            self._bases[key] = convert(self.model, self.size, **kwargs)
        return self._bases[key]

    def path(self, name: str) -> Path:
        """Build (once) and save the variant ``name``; see :func:`variant_names`."""
        if name not in self._paths:
            fmt, io_mode, weights = name.split("/")
            image = io_mode == "image"
            if fmt == "mlprogram":
                precision = "fp32" if weights == "fp32" else "fp16"
                # iOS 16's constexpr_lut_to_dense takes 1/2/4/6/8-bit tables only; 3-bit needs iOS 18
                ios18 = weights in ("sparse-pal4", "int4-block", "pal3") or weights.endswith("-ios18")
                weights = weights.removesuffix("-ios18")
                ml = self.base(program=True, precision=precision, image_io=image, target="iOS18" if ios18 else "iOS16")
                if weights not in ("fp32", "fp16"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ml = compress_program(ml, weights)
                suffix = ".mlpackage"
            else:
                ml = self.base(program=False, image_io=image)
                if weights != "fp32":
                    ml = compress_network(ml, weights)
                suffix = ".mlmodel"
            path = self.folder / (name.replace("/", "-") + suffix)
            ml.save(str(path))
            self._paths[name] = path
        return self._paths[name]


#: format/io/weights of every variant the reference executor is checked on. "fp16-ios18" etc. are
#: converted for iOS 18, whose opset writes compressed weights with different constexpr ops.
MLPROGRAM_VARIANTS = [f"mlprogram/tensor/{w}" for w in
                      ("fp32", "fp16", "int8", "int8-affine", "pal8", "pal6", "pal4", "pal3", "pal2", "sparse",
                       "sparse-pal4", "int8-ios18", "pal4-ios18", "int4-block")] + \
                     [f"mlprogram/image/{w}" for w in ("fp32", "fp16", "int8", "pal4", "sparse-pal4")]
NEURALNETWORK_VARIANTS = [f"neuralnetwork/tensor/{w}" for w in ("fp32", "fp16", "int8", "lut8", "lut4", "lut2",
                                                                 "linlut2")] + \
                         [f"neuralnetwork/image/{w}" for w in ("fp32", "fp16", "int8", "lut4")]


class OpZooA(nn.Module):
    """Layers beyond TinyBeauty's: pooling, unfused BatchNorm, bilinear upsampling, a padded
    ConvTranspose2d, replicate / asymmetric constant padding, leaky ReLU, sigmoid, ReLU6."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.up = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.rep = nn.ReplicationPad2d(1)
        self.c2 = nn.Conv2d(2 * width, width, 3)
        self.zp = nn.ConstantPad2d((1, 2, 0, 1), 0.5)
        self.c3 = nn.Conv2d(width, 3, (2, 4))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.leaky_relu(self.c1(x), 0.1)
        b = self.bn(torch.sigmoid(a))
        p = self.avg(self.pool(b))
        u = self.up(p)
        u2 = torch.nn.functional.interpolate(p, scale_factor=2, mode="bilinear", align_corners=False)
        c = self.c2(self.rep(torch.cat([u, u2], 1)))
        return torch.tanh(self.c3(self.zp(torch.nn.functional.relu6(c))))


class OpZooB(nn.Module):
    """Elementwise and layout ops: pixel shuffle, nn.LayerNorm, SiLU / GELU / ELU, pow, mean,
    rsqrt, where, permute + softmax, slicing, abs, division, clamp, softplus, sum.
    (Batch 1 only, like the Core ML models made from it.)"""

    def __init__(self, width: int = 8, size: int = 32):
        super().__init__()
        self.size, self.width = size, width
        self.c1 = nn.Conv2d(3, 4 * width, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm([width, size, size])
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, 3, 1)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        y = self.ln(f.pixel_shuffle(self.c1(x), 2))
        y = f.silu(y) + f.gelu(y) - f.elu(y)
        y = y * torch.rsqrt(y.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-3)
        y = torch.where(y > 0, y, 0.2 * y)
        s = self.size
        t = y.permute(0, 2, 3, 1).reshape(1, -1, self.width).softmax(dim=-1).reshape(1, s, s, self.width)
        y = y + t.permute(0, 3, 1, 2)
        z = f.pad(self.c2(y)[:, :, 1:-1, 2:], (0, 2, 1, 1))
        z = torch.clamp(z / (1.0 + z.abs()), -0.9, 0.9) + f.softplus(z).sum(dim=1, keepdim=True) / 8
        return torch.tanh(self.c3(z))


class OpZoo(nn.Module):
    """Both zoos in one network (one conversion per format): ``B(x + A(x))``."""

    def __init__(self, width: int = 8, size: int = 32):
        super().__init__()
        self.a = OpZooA(width)
        self.b = OpZooB(width, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + self.a(x))
