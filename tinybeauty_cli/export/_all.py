"""Export a float model to Core ML: ``.mlmodel`` (NeuralNetwork, iOS 13+) or ``.mlpackage`` (ML Program, iOS 15+).

The output's extension picks the format. Weights are stored as fp16 or fp32, or compressed:
linear int8 per output channel, or palettized to 2-8 bits with a k-means look-up table per
tensor (scikit-learn; on the NeuralNetwork format through coremltools' own
``quantize_weights(..., "custom_lut")``, because its built-in k-means path crashes on
numpy 2). Weights of a pruned checkpoint can be stored sparse in an ML Program (iOS 16+),
also together with palettization or int8 (iOS 18+). Only convolution and linear weights are
compressed; biases and norm scales stay at float precision.

With ``io="image"`` the model takes an RGB image (Core ML scales it so the network sees
[-1, 1]) and returns the made-up RGB image, computed inside the graph as
``(clamp(x + r, -1, 1) + 1) * 127.5``; with ``io="tensor"`` a float multiarray goes in and
the residual comes out.

The graph is kept small: TinyBeauty's custom LayerNorm becomes ``layer_norm`` (ML Program)
or ``reshape -> instance norm -> reshape`` (NeuralNetwork) and one per-channel affine op,
instead of fourteen element-wise ops; identical constants are shared, names are short and
small tensors live in the graph description (see :mod:`.coreml_file`).

:func:`decompressed_model` gives a PyTorch model holding exactly the weights a written file
holds after decompression, so the quality of a compressed export can be measured on Linux.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..core.checkpoint import Artifact, HistoryStep, LoadedModel, Preprocessing, load_model
from ..coreml.spec import (
    FileWeight,
    compact_neural_network,
    compact_program,
    coremltools,
    inline_small_weights,
    load_program,
    neural_network_weight_bytes,
    neural_network_weights,
    package_parts,
    program_weights,
    quiet,
)
from ..core.errors import ConfigError, InputError, TbOptError, UnsupportedError, UsageError
from ..core.files import atomic_output, check_output, size_on_disk, zipped_size
from ..core.images import synthetic_unlabeled, uint8_to_model
from ..core.quality import psnr_db
from ..core.model import LayerNorm
from .palettes import kmeans_lut
from .config import (CONFIG_VERSION, FORMAT_BY_SUFFIX, FORMAT_NAMES, IMAGE_IN, IMAGE_OUT, META_PREFIX, SPARSE_MIN_ZEROS,
                     TARGETS, TENSOR_IN, TENSOR_OUT, WEIGHT_MODES, _WEIGHT_OPS, ExportConfig, ExportPlan,
                     _target_index, format_for_path, normalize_target, plan_export, requirements, sparse_threshold,
                     storage_bits)
from ..core.counts import input_channels
from ..core.progress import Progress, SilentProgress

class ExportError(TbOptError):
    """coremltools could not convert or compress the model."""


# --- the PyTorch module that is traced ----------------------------------------------------------------


class CoreMLLayerNorm(nn.Module):
    """TinyBeauty's LayerNorm as Core ML computes it: two ops (three) instead of fourteen.

    The original divides by the unbiased standard deviation over (C, H, W) plus eps; here
    the Bessel factor is folded into ``gamma`` and eps sits inside the square root (a
    relative difference below 1e-5 of the output). ``flavour`` picks the normalization:
    ``layer_norm`` (ML Program) or ``instance_norm`` of the tensor reshaped to one channel
    (NeuralNetwork, whose layer_norm lowering materialises (C, H, W) gamma/beta tensors).
    coremltools turns the per-channel ``* gamma + beta`` into one ``batch_norm`` op (mean 0,
    variance 1, eps 1e-5: a further factor 1/sqrt(1 + 1e-5) on gamma, 5e-6 relative).
    """

    def __init__(self, norm: LayerNorm, shape: tuple[int, int, int], flavour: str):
        super().__init__()
        c, h, w = shape
        n = c * h * w
        bessel = ((n - 1) / n) ** 0.5
        self.shape = (int(c), int(h), int(w))
        self.flavour = flavour
        self.eps = float(norm.eps)
        self.weight = nn.Parameter(norm.gamma.detach().reshape(1, -1, 1, 1) * bessel)
        self.bias = nn.Parameter(norm.beta.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        if self.flavour == "layer_norm":
            y = F.layer_norm(x, (c, h, w), eps=self.eps)
        else:
            y = F.instance_norm(x.reshape(-1, 1, c * h, w), eps=self.eps).reshape(-1, c, h, w)
        return y * self.weight + self.bias


def _norm_shapes(model: nn.Module, size: int, channels: int) -> dict[str, tuple[int, int, int]]:
    """Input shape of every TinyBeauty LayerNorm at ``size`` (a shape-only pass on the meta device)."""
    if not any(isinstance(m, LayerNorm) for m in model.modules()):
        return {}
    shapes: dict[str, tuple[int, int, int]] = {}
    probe = copy.deepcopy(model).to("meta")
    for name, mod in probe.named_modules():
        if isinstance(mod, LayerNorm):
            mod.register_forward_hook(lambda m, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[1:])))
    try:
        with torch.no_grad():
            probe(torch.zeros(1, channels, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - e.g. a size the network cannot take
        raise ExportError(f"the model cannot run at {size}x{size}: {type(exc).__name__}: {exc}") from exc
    return shapes


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv with torch.fx (what Core ML would do anyway).

    Doing it here keeps every weight in the file a tensor of the PyTorch module, which
    :func:`decompressed_model` relies on. Networks torch.fx cannot trace are left as they are.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse  # noqa: PLC0415

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: Core ML fuses it itself
        return model


def coreml_ready_module(model: nn.Module, size: int, fmt: str, channels: int = 3) -> nn.Module:
    """A copy of ``model`` with Core ML-friendly norms and folded batch norms (same function)."""
    model = copy.deepcopy(model).eval()
    flavour = "layer_norm" if fmt == "mlprogram" else "instance_norm"
    for name, shape in _norm_shapes(model, size, channels).items():
        _replace_module(model, name, CoreMLLayerNorm(model.get_submodule(name), shape, flavour))
    return _fold_batch_norms(model).eval()


class CoreMLIO(nn.Module):
    """What the Core ML model computes around the network: image in/out or tensor in/residual out."""

    def __init__(self, net: nn.Module, io: str, preprocessing: Preprocessing):
        super().__init__()
        self.net = net
        self.io = io
        self.lo, self.hi = preprocessing.value_range
        self.returns_image = preprocessing.output == "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.io == "tensor":
            return y
        made_up = torch.clamp(y if self.returns_image else x + y, self.lo, self.hi)
        if (self.lo, self.hi) == (-1.0, 1.0):
            return (made_up + 1.0) * 127.5
        return (made_up - self.lo) * (255.0 / (self.hi - self.lo))


def _weight_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float parameters and buffers of rank >= 1 (what a Core ML file must hold)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dim() >= 1:
            out[name] = t.detach()
    return out


def _compressible(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv / linear weights: the tensors --weights and --sparse act on."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                            nn.ConvTranspose3d, nn.Linear)):
            out[f"{name}.weight"] = mod.weight.detach()
    return out


def tensor_zeros(model: nn.Module) -> list[tuple[int, int]]:
    """(zeros, size) of every conv/linear weight."""
    return [(int((w == 0).sum()), w.numel()) for w in _compressible(model).values()]


# --- conversion ----------------------------------------------------------------------------------------------


def tensor_dtype(config: ExportConfig, target: str) -> str:
    """Multiarray I/O type: fp16 where an ML Program computes in fp16 and iOS16+ allows fp16 I/O (no casts)."""
    fp16_io = config.format == "mlprogram" and config.precision == "fp16" and _target_index(target) >= 3
    return "float16" if fp16_io else "float32"


def _io_types(ct: Any, config: ExportConfig, plan: ExportPlan, prep: Preprocessing, size: int,
              channels: int) -> tuple[list, list]:
    shape = (1, channels, size, size)
    if config.io == "tensor":
        dtype = np.float16 if tensor_dtype(config, plan.target) == "float16" else np.float32
        return ([ct.TensorType(name=TENSOR_IN, shape=shape, dtype=dtype)],
                [ct.TensorType(name=TENSOR_OUT, dtype=dtype)])
    if channels != 3:
        raise UnsupportedError(f"--io image needs a 3-channel (RGB) network; this one takes {channels} channels",
                               hint="use --io tensor")
    lo, hi = prep.value_range
    scale = (hi - lo) / 255.0
    inputs = [ct.ImageType(name=IMAGE_IN, shape=shape, scale=scale, bias=[lo, lo, lo],
                           color_layout=ct.colorlayout.RGB)]
    return inputs, [ct.ImageType(name=IMAGE_OUT, color_layout=ct.colorlayout.RGB)]


def _convert(traced: torch.jit.ScriptModule, config: ExportConfig, plan: ExportPlan, prep: Preprocessing,
             size: int, channels: int) -> Any:
    ct = coremltools()
    inputs, outputs = _io_types(ct, config, plan, prep, size, channels)
    kwargs: dict[str, Any] = dict(inputs=inputs, outputs=outputs,
                                  minimum_deployment_target=getattr(ct.target, plan.target),
                                  skip_model_load=True)
    if config.format == "mlprogram":
        kwargs.update(convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT16 if config.precision == "fp16" else ct.precision.FLOAT32)
    else:
        kwargs.update(convert_to="neuralnetwork")
    try:
        with quiet():
            return ct.convert(traced, **kwargs)
    except Exception as exc:  # noqa: BLE001 - coremltools raises anything; say what failed
        raise ExportError(f"coremltools could not convert the model: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


def _compress_program(mlmodel: Any, config: ExportConfig, plan: ExportPlan) -> Any:
    ct = coremltools()
    opt = ct.optimize.coreml
    mode = config.weight_mode
    with quiet():
        if plan.sparse:
            # Exact zeros only (threshold far below fp16 resolution); a tensor is stored sparse
            # only where the mask (1 bit per weight) costs less than the zeros it drops.
            pruner = opt.OpThresholdPrunerConfig(threshold=1e-12, minimum_sparsity_percentile=plan.sparse_threshold,
                                                 weight_threshold=0)
            mlmodel = opt.prune_weights(mlmodel, opt.OptimizationConfig(
                op_type_configs={t: pruner for t in _WEIGHT_OPS}))
        joint = plan.sparse
        if mode == "int8":
            cfg = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                              weight_threshold=0)
            mlmodel = opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(
                op_type_configs={t: cfg for t in _WEIGHT_OPS}), joint_compression=joint)
        elif config.palette_bits is not None:
            bits = config.palette_bits
            def lut_function(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                lut, indices = kmeans_lut(weights, bits)
                return lut.astype(weights.dtype), indices

            cfg = opt.OpPalettizerConfig(mode="custom", lut_function=lut_function,
                                         granularity="per_tensor", weight_threshold=0)
            mlmodel = opt.palettize_weights(mlmodel, opt.OptimizationConfig(
                op_type_configs={t: cfg for t in _WEIGHT_OPS}), joint_compression=joint)
    return mlmodel


class _ConvWeightsOnly:
    """NeuralNetwork quantization selector: conv / inner-product weights, not their biases."""

    def __init__(self) -> None:
        from coremltools.models.neural_network.quantization_utils import QuantizedLayerSelector  # noqa: PLC0415

        self._base = QuantizedLayerSelector()

    def do_quantize(self, layer: Any, weight_param: str | None = None, **_: Any) -> bool:
        if layer.WhichOneof("layer") not in ("convolution", "innerProduct", "batchedMatmul"):
            return False
        return weight_param != "bias"


def _compress_neural_network(mlmodel: Any, config: ExportConfig) -> Any:
    ct = coremltools()
    from coremltools.models.neural_network import quantization_utils as qu  # noqa: PLC0415

    mode = config.weight_mode
    with quiet():
        if mode == "int8":
            mlmodel = qu.quantize_weights(mlmodel, 8, "linear", selector=_ConvWeightsOnly())
        elif config.palette_bits is not None:
            bits = config.palette_bits

            def lut_function(nbits: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return kmeans_lut(weights, nbits)

            mlmodel = qu.quantize_weights(mlmodel, bits, "custom_lut", lut_function=lut_function,
                                          selector=_ConvWeightsOnly())
        if config.precision == "fp16":  # everything still in fp32 (biases, norms, or all weights)
            mlmodel = qu.quantize_weights(mlmodel, 16)
    if not isinstance(mlmodel, ct.models.MLModel):  # quantize_weights returns a spec off macOS 10.14+
        mlmodel = ct.models.MLModel(mlmodel, skip_model_load=True)
    return mlmodel


# --- metadata ---------------------------------------------------------------------------------------------


def _compression_label(config: ExportConfig, sparse: bool) -> str:
    mode = config.weight_mode
    label = {"fp16": "fp16", "fp32": "fp32", "int8": "int8 per-channel (linear)"}.get(
        mode, f"{config.palette_bits}-bit palettized (k-means LUT per tensor)")
    return label + (", sparse" if sparse else "")


def _describe(spec: Any, loaded: LoadedModel, artifact: Artifact, config: ExportConfig, plan: ExportPlan,
              size: int, history: list[HistoryStep]) -> None:
    is_tinybeauty = artifact.arch.name == "tinybeauty"
    net = "TinyBeauty facial makeup" if is_tinybeauty else f"{artifact.arch.target} image-to-image network"
    md = spec.description.metadata
    md.author = config.author or ("TinyBeauty (ECCV 2024) architecture; Core ML export by tbopt"
                                  if is_tinybeauty else f"exported by tbopt {__version__}")
    md.license = config.license or "not specified by the checkpoint"
    md.versionString = config.model_version
    prep = artifact.preprocessing
    lo, hi = prep.value_range
    if config.io == "image":
        md.shortDescription = (f"{net}: a {size}x{size} RGB face crop in, the made-up face out "
                               f"({config.precision} compute, {_compression_label(config, plan.sparse)} weights).")
        in_desc = f"RGB face crop, {size}x{size}; Core ML scales it so the network sees [{lo:g}, {hi:g}]"
        out_desc = (f"made-up face, {size}x{size} RGB, computed in the graph as "
                    f"(clamp(x + r, {lo:g}, {hi:g}) - {lo:g}) * {255 / (hi - lo):g}")
    else:
        md.shortDescription = (f"{net}: a (1, 3, {size}, {size}) float array in [{lo:g}, {hi:g}] in, "
                               f"the {'image' if prep.output == 'image' else 'residual'} out "
                               f"({config.precision} compute, {_compression_label(config, plan.sparse)} weights).")
        in_desc = f"float32 (1, 3, {size}, {size}), RGB scaled to [{lo:g}, {hi:g}]"
        out_desc = ("made-up image in the input's range" if prep.output == "image" else
                    f"residual r in ({lo:g}, {hi:g}); the made-up face is clamp(input + r, {lo:g}, {hi:g})")
    spec.description.input[0].shortDescription = in_desc
    spec.description.output[0].shortDescription = out_desc
    user = md.userDefined
    compact = dict(separators=(",", ":"), default=str)
    user[META_PREFIX + "version"] = __version__
    user[META_PREFIX + "source_sha256"] = loaded.sha256
    user[META_PREFIX + "architecture"] = artifact.arch.describe()
    user[META_PREFIX + "arch"] = json.dumps(artifact.arch.to_dict(), **compact)
    user[META_PREFIX + "preprocessing"] = json.dumps({**prep.to_dict(), "size": size}, **compact)
    user[META_PREFIX + "history"] = json.dumps([h.to_dict() for h in history], **compact)
    user[META_PREFIX + "export"] = json.dumps(config.to_dict(), **compact)


# --- the result ---------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    path: str
    format: str
    target: str
    precision: str
    weights: str  # how conv/linear weights are stored
    sparse: bool
    io: str
    size: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    size_bytes: int
    zipped_bytes: int
    graph_bytes: int  # graph description (model.mlmodel in a package; the non-weight part of a .mlmodel)
    weight_bytes: int
    ops: dict[str, int]  # op (ML Program) or layer (NeuralNetwork) types and counts
    casts: int
    parameters: int
    zero_fraction: float
    sparse_tensors: int  # weight tensors stored sparse
    validation: dict[str, Any]
    seconds: float
    notes: list[str]
    config: dict[str, Any]
    source: str
    source_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- validation ----------------------------------------------------------------------------------------------


def _feature(desc: Any) -> dict[str, Any]:
    t = desc.type
    kind = t.WhichOneof("Type")
    if kind == "imageType":
        color = {10: "grayscale", 20: "RGB", 30: "BGR"}.get(t.imageType.colorSpace, str(t.imageType.colorSpace))
        return {"name": desc.name, "type": "image", "color": color,
                "shape": [int(t.imageType.height), int(t.imageType.width)]}
    if kind == "multiArrayType":
        dtype = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32"}.get(
            t.multiArrayType.dataType, str(t.multiArrayType.dataType))
        return {"name": desc.name, "type": "multiarray", "dtype": dtype,
                "shape": [int(s) for s in t.multiArrayType.shape]}
    return {"name": desc.name, "type": kind}


def _expected_features(config: ExportConfig, target: str, size: int, channels: int) -> tuple[list[dict], list[dict]]:
    if config.io == "image":
        return ([{"name": IMAGE_IN, "type": "image", "color": "RGB", "shape": [size, size]}],
                [{"name": IMAGE_OUT, "type": "image", "color": "RGB", "shape": [size, size]}])
    shape = [1, channels, size, size]
    dtype = tensor_dtype(config, target)
    return ([{"name": TENSOR_IN, "type": "multiarray", "dtype": dtype, "shape": shape}],
            [{"name": TENSOR_OUT, "type": "multiarray", "dtype": dtype, "shape": shape}])


def read_weights(path: Path) -> list[FileWeight]:
    """Every weight tensor of a ``.mlmodel`` / ``.mlpackage``, decompressed to float32."""
    path = Path(path)
    if path.suffix.lower() == ".mlpackage":
        return program_weights(path)
    ct = coremltools()
    with quiet():
        spec = ct.utils.load_spec(str(path))
    return neural_network_weights(spec)


@dataclass
class WeightMatch:
    """Which file tensor holds each PyTorch tensor, and its relative error (compression error)."""

    values: dict[str, torch.Tensor]
    relative_error: dict[str, float]
    storage: dict[str, str]


def match_weights(module: nn.Module, weights: list[FileWeight]) -> WeightMatch:
    """Pair every float tensor of ``module`` with the file tensor that stores it.

    Core ML files do not keep PyTorch's names, so tensors are paired by size and value:
    each parameter takes the file tensor of the same size closest to it. Compression error
    (k-means palettes, int8, fp16) is far smaller than the distance between two different
    tensors; a parameter whose best match is not clearly better than the runner-up is an error.
    """
    by_size: dict[int, list[FileWeight]] = {}
    for w in weights:
        by_size.setdefault(w.value.size, []).append(w)
    values: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    storage: dict[str, str] = {}
    missing = []
    for name, p in _weight_params(module).items():
        target = p.float().numpy()
        scale = max(float(np.linalg.norm(target)), 1e-12)
        scored = sorted(((float(np.linalg.norm(w.value.reshape(target.shape) - target)) / scale, i, w)
                         for i, w in enumerate(by_size.get(target.size, []))), key=lambda s: s[:2])
        if not scored or scored[0][0] > 0.75:
            if np.all(target == 0) or np.all(target == 1):
                # adding zeros / multiplying by ones is dropped by the converter: exact as it is
                values[name], errors[name], storage[name] = p.float().clone(), 0.0, "folded away (no-op)"
                continue
            missing.append(name)
            continue
        best_err, _, best = scored[0]
        for err, _, other in scored[1:]:
            if np.array_equal(other.value, best.value):
                continue  # an identical tensor: either is right
            if err < max(2.0 * best_err, 1e-3):
                raise ExportError(f"cannot tell which tensor of the Core ML file holds {name}: "
                                  f"{best.name} and {other.name} are both close to it")
            break
        values[name] = torch.from_numpy(best.value.reshape(target.shape).copy())
        errors[name] = best_err
        storage[name] = best.storage
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise UnsupportedError(f"the Core ML file holds no tensor matching {shown}: the converter merged "
                               f"them into other operations, so no PyTorch model carries its exact weights")
    return WeightMatch(values, errors, storage)


def _file_config(path: Path) -> tuple[ExportConfig, int]:
    ct = coremltools()
    with quiet():
        spec = ct.utils.load_spec(str(path))
    user = spec.description.metadata.userDefined
    if META_PREFIX + "export" not in user:
        raise InputError(f"{path} was not written by tbopt export (no {META_PREFIX}export metadata)")
    config = ExportConfig.from_dict(json.loads(user[META_PREFIX + "export"]))
    size = int(json.loads(user[META_PREFIX + "preprocessing"])["size"])
    return config, size


def decompressed_model(coreml_path: Path | str, source: LoadedModel | Artifact) -> nn.Module:
    """A PyTorch model carrying exactly the weights the Core ML file holds after decompression.

    Palettes are looked up, int8 weights scaled, sparse tensors expanded and fp16 values
    kept as rounded. The model maps a float (N, 3, S, S) batch in the input range to the
    residual, like the original network (and is the same function as the Core ML graph
    apart from the compute precision: it runs in fp32). ``source`` is the float model the
    file was exported from; it provides the structure.
    """
    coreml_path = Path(coreml_path)
    artifact = source.artifact if isinstance(source, LoadedModel) else source
    if artifact is None:
        raise UnsupportedError("decompressed_model needs the float model the file was exported from")
    config, size = _file_config(coreml_path)
    module = coreml_ready_module(artifact.build_model(), size, config.format)
    match = match_weights(module, read_weights(coreml_path))
    module.load_state_dict(match.values, strict=False)
    return module.eval()


def _graph_ops(path: Path, fmt: str) -> Counter:
    ct = coremltools()
    with quiet():
        spec = ct.utils.load_spec(str(path))
    if fmt == "neuralnetwork":
        return Counter(layer.WhichOneof("layer") for layer in spec.neuralNetwork.layers)
    _, block = spec.mlProgram.functions["main"], None
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    return Counter(op.type for op in block.operations if op.type != "const")


def _fidelity(reference: nn.Module, candidate: nn.Module, size: int, prep: Preprocessing, count: int = 2) -> dict:
    """Made-up images of the float model vs the model with the file's weights (PyTorch, fp32)."""
    images = synthetic_unlabeled(count, size, seed=7)
    x = torch.from_numpy(uint8_to_model(images.inputs))
    lo, hi = prep.value_range
    if (lo, hi) != (-1.0, 1.0):
        x = (x + 1.0) / 2.0 * (hi - lo) + lo
    with torch.no_grad():
        a, b = reference(x), candidate(x)
    if prep.output != "image":
        a, b = torch.clamp(x + a, lo, hi), torch.clamp(x + b, lo, hi)
    per_image = psnr_db(a.numpy(), b.numpy(), data_range=hi - lo)
    capped = np.minimum(per_image, 150.0)
    return {"images": count, "fidelity_psnr_db": round(float(np.mean(capped)), 2),
            "worst_fidelity_db": round(float(np.min(capped)), 2)}


def _validate(path: Path, config: ExportConfig, target: str, size: int, channels: int, module: nn.Module,
              reference: nn.Module, prep: Preprocessing) -> tuple[dict[str, Any], list[dict], list[dict], WeightMatch]:
    ct = coremltools()
    try:
        with quiet():
            spec = ct.utils.load_spec(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the written file does not load as a Core ML model: {exc}") from exc
    inputs = [_feature(f) for f in spec.description.input]
    outputs = [_feature(f) for f in spec.description.output]
    want_in, want_out = _expected_features(config, target, size, channels)
    if inputs != want_in or outputs != want_out:
        raise ExportError(f"the written model's interface is {inputs} -> {outputs}, expected {want_in} -> {want_out}")
    if config.format == "mlprogram":
        try:
            load_program(path)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the written ML Program does not read back: {exc}") from exc
    match = match_weights(module, read_weights(path))
    exact = copy.deepcopy(module)
    exact.load_state_dict(match.values, strict=False)
    fid = _fidelity(reference, exact.eval(), size, prep)
    worst = max(match.relative_error.items(), key=lambda kv: kv[1]) if match.relative_error else ("-", 0.0)
    validation = {
        "spec_loads": True,
        "interface": "as promised",
        "weights_decompressed": len(match.values),
        "weight_storage": dict(Counter(match.storage.values()).most_common()),
        "max_weight_error": round(worst[1], 5),
        "max_weight_error_tensor": worst[0],
        **fid,
        "numerical_check": "PyTorch with the file's decompressed weights vs the float model "
                           "(the Core ML runtime itself is macOS-only)",
    }
    return validation, inputs, outputs, match


# --- the whole export -------------------------------------------------------------------------------------------


def _refuse_torchscript(loaded: LoadedModel) -> None:
    if loaded.kind != "torchscript":
        return
    if loaded.metadata.get("quantized"):
        raise UnsupportedError(
            f"{loaded.path} is an int8 TorchScript model (from tbopt quantize); its PyTorch int8 weights "
            f"cannot be carried into Core ML",
            hint="export the float checkpoint it was made from with --weights int8 "
                 "(int8 per-channel weights in the Core ML file)")
    raise UnsupportedError(f"{loaded.path} is a TorchScript archive; tbopt exports float checkpoints and "
                           f"tbopt artifacts", hint="export the float checkpoint it was made from")


def export_loaded(loaded: LoadedModel, output: Path | str, config: ExportConfig, *, force: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Export an opened float model to ``output`` (written atomically, validated before it lands)."""
    started = time.perf_counter()
    progress = progress or SilentProgress()
    output = Path(output)
    if format_for_path(output) != config.format:
        raise UsageError(f"{output.name} is a {FORMAT_NAMES[format_for_path(output)]} file but the configuration "
                         f"asks for {FORMAT_NAMES[config.format]}")
    _refuse_torchscript(loaded)
    check_output(output, force, inputs=(loaded.path,))
    artifact = loaded.artifact
    assert artifact is not None and loaded.module is not None
    prep = artifact.preprocessing
    size = config.size or prep.size
    model = loaded.module.eval()
    channels = input_channels(model)
    plan = plan_export(config, tensor_zeros(model))

    with progress.task("exporting", total=4) as advance:
        module = coreml_ready_module(model, size, config.format, channels)
        wrapped = CoreMLIO(module, config.io, prep).eval()
        example = torch.zeros(1, channels, size, size)
        try:
            with torch.no_grad(), quiet():
                traced = torch.jit.trace(wrapped, example, check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the model cannot be traced at {size}x{size}: {type(exc).__name__}: {exc}") from exc
        advance(1)
        with inline_small_weights():
            mlmodel = _convert(traced, config, plan, prep, size, channels)
            advance(1)
            try:
                if config.format == "mlprogram":
                    mlmodel = _compress_program(mlmodel, config, plan)
                else:
                    mlmodel = _compress_neural_network(mlmodel, config)
            except TbOptError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"coremltools could not compress the weights ({config.weight_mode}): "
                                  f"{type(exc).__name__}: {exc}") from exc
        advance(1)
        ct = coremltools()
        spec = mlmodel.get_spec()
        if config.format == "mlprogram":
            compact_program(spec)
        else:
            compact_neural_network(spec)
            if config.io == "tensor":  # the converter leaves the output shape open; it is fixed
                out_type = spec.description.output[0].type.multiArrayType
                del out_type.shape[:]
                out_type.shape.extend([1, channels, size, size])  # a residual: the input's shape
        step = HistoryStep.now("export", "tbopt export", config.to_dict(),
                               {"target": plan.target, "sparse": plan.sparse})
        _describe(spec, loaded, artifact, config, plan, size, [*artifact.history, step])
        with atomic_output(output, force=force, directory=config.format == "mlprogram") as tmp:
            with quiet():
                weights_dir = mlmodel.weights_dir if config.format == "mlprogram" else None
                ct.models.MLModel(spec, weights_dir=weights_dir, skip_model_load=True).save(str(tmp))
            validation, inputs, outputs, _ = _validate(tmp, config, plan.target, size, channels, module, model, prep)
            sizes = _sizes(tmp, config.format)
            ops = _graph_ops(tmp, config.format)
        advance(1)
    params = sum(p.numel() for p in model.parameters())
    return ExportResult(
        path=str(output), format=config.format, target=plan.target, precision=config.precision,
        weights=_compression_label(config, plan.sparse), sparse=plan.sparse, io=config.io, size=size,
        inputs=inputs, outputs=outputs, **sizes, ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        casts=ops.get("cast", 0), parameters=params, zero_fraction=round(plan.zero_fraction, 4), sparse_tensors=ops.get("constexpr_sparse_to_dense", 0), validation=validation,
        seconds=round(time.perf_counter() - started, 2), notes=plan.notes, config=config.to_dict(),
        source=str(loaded.path), source_sha256=loaded.sha256)


def _sizes(path: Path, fmt: str) -> dict[str, int]:
    total = size_on_disk(path)
    if fmt == "mlprogram":
        graph, weights = package_parts(path)
        graph_bytes = graph.stat().st_size
        weight_bytes = weights.stat().st_size if weights is not None else 0
    else:
        ct = coremltools()
        with quiet():
            spec = ct.utils.load_spec(str(path))
        weight_bytes = neural_network_weight_bytes(spec)
        graph_bytes = total - weight_bytes
    return {"size_bytes": total, "zipped_bytes": zipped_size(path), "graph_bytes": graph_bytes,
            "weight_bytes": weight_bytes}


def export_model(path: Path | str, output: Path | str, config: ExportConfig, *, force: bool = False,
                 progress: Progress | None = None, arch: str | None = None,
                 arch_kwargs: str | Mapping[str, Any] | None = None, trust_pickle: bool = False) -> ExportResult:
    """Open a model file and export it (see :func:`export_loaded`); checks the output path first."""
    output, path = Path(output), Path(path)
    format_for_path(output)
    if path.suffix.lower() in FORMAT_BY_SUFFIX:
        raise InputError(f"{path} is already a Core ML model; tbopt export converts float PyTorch models",
                         hint="give the checkpoint or tbopt artifact it was exported from")
    check_output(output, force, inputs=(path,))
    loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    return export_loaded(loaded, output, config, force=force, progress=progress)
