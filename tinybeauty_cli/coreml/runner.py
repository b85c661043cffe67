"""Run Core ML models (``.mlpackage`` ML Programs, ``.mlmodel`` NeuralNetworks) behind the Runner interface.

On macOS with Core ML, predictions come from Core ML itself
(``coremltools.models.MLModel``, with a choice of compute units). Everywhere else --
coremltools can convert and read models on Linux but not run them -- a **reference
executor** reads the model's own graph and weights and evaluates it with PyTorch
(:mod:`tinybeauty_cli.coreml_exec`). Its numbers are the model's arithmetic on this CPU,
not the device's: every time measured with it is labelled :data:`REFERENCE_ENGINE`.

Images cross the boundary as Core ML moves them: an image input is an 8-bit RGB or BGR
pixel buffer (the network's ``scale``/``bias`` are applied by the model itself), an
image output is produced as 0..255 and stored in 8 bits (rounded, clamped). Tensor
inputs take the model-space batch in [-1, 1]; a tensor output is the residual unless
the model's tbopt metadata says it returns the made-up image.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import Preprocessing
from ..core.errors import ConfigError, InputError, UnsupportedError
from ..core.runner import Runner
from .units import ComputeUnits, parse_compute_units

#: How every figure computed by the reference executor is labelled (it is not device latency).
REFERENCE_ENGINE = "Core ML reference executor (not device)"
SUFFIXES = (".mlpackage", ".mlmodel")


@functools.lru_cache(maxsize=1)
def import_coremltools() -> Any:
    """coremltools, imported once and quietly (it logs warnings about untested torch versions
    and, off macOS, about its missing native extension)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools

    return coremltools


def coreml_available() -> bool:
    """True where Core ML itself can run predictions: macOS with coremltools' native extension."""
    if sys.platform != "darwin":
        return False
    try:
        import_coremltools()
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- what the file declares

#: Core ML specification version -> first OS that runs it.
_SPEC_TARGETS = {1: "iOS11", 2: "iOS11.2", 3: "iOS12", 4: "iOS13", 5: "iOS14", 6: "iOS15", 7: "iOS16",
                 8: "iOS17", 9: "iOS18"}
_ARRAY_TYPES = {65568: "fp32", 65600: "fp64", 65552: "fp16", 131104: "int32"}
_COLOR_SPACES = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}


@dataclass(frozen=True)
class Feature:
    """One declared input or output of a Core ML model."""

    name: str
    kind: str  # "image" | "tensor"
    shape: tuple[int, ...]  # images: (1, channels, height, width)
    dtype: str  # tensors: fp32 / fp16 / ...; images: uint8
    color: str | None = None  # images: RGB / BGR / GRAYSCALE

    def describe(self) -> str:
        if self.kind == "image":
            return f"image {self.name!r} {self.shape[3]}x{self.shape[2]} {self.color} (8-bit)"
        return f"tensor {self.name!r} {tuple(self.shape)} {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
                "color": self.color}


def _feature(desc: Any, role: str) -> Feature:
    kind = desc.type.WhichOneof("Type")
    if kind == "imageType":
        t = desc.type.imageType
        color = _COLOR_SPACES.get(t.colorSpace, str(t.colorSpace))
        channels = 1 if color.startswith("GRAYSCALE") else 3
        return Feature(desc.name, "image", (1, channels, int(t.height), int(t.width)), "uint8", color)
    if kind == "multiArrayType":
        t = desc.type.multiArrayType
        shape = tuple(int(d) for d in t.shape)
        if not shape and t.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            shape = tuple(int(d) for d in t.enumeratedShapes.shapes[0].shape)
        return Feature(desc.name, "tensor", shape, _ARRAY_TYPES.get(t.dataType, str(t.dataType)))
    raise UnsupportedError(f"the model's {role} {desc.name!r} is a {kind}; tbopt runs image-to-image models")


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


@dataclass
class CoreMLModelFile:
    """A Core ML file as declared: format, spec version, the one input and output, metadata."""

    path: Path
    spec: Any
    format: str  # "mlprogram" | "neuralnetwork"
    input: Feature
    output: Feature
    user_metadata: dict[str, str]
    weights_dir: str | None = None

    @property
    def target(self) -> str:
        return _SPEC_TARGETS.get(self.spec.specificationVersion, f"spec v{self.spec.specificationVersion}")

    @property
    def tbopt_metadata(self) -> dict[str, Any]:
        """tbopt's own keys: ``tbopt`` (a JSON object) and ``tbopt.<key>`` (JSON values)."""
        meta: dict[str, Any] = {}
        if "tbopt" in self.user_metadata:
            blob = _maybe_json(self.user_metadata["tbopt"])
            if isinstance(blob, dict):
                meta.update(blob)
        for k, v in self.user_metadata.items():
            if k.startswith("tbopt."):
                meta[k[len("tbopt."):]] = _maybe_json(v)
        return meta

    @property
    def preprocessing(self) -> Preprocessing:
        """Size from the declared input; value range and tensor-output meaning from tbopt's
        metadata when the file has it ([-1, 1] and a residual otherwise)."""
        size = self.input.shape[-1]
        declared = self.tbopt_metadata.get("preprocessing")
        declared = declared if isinstance(declared, dict) else {}
        output = "image" if self.output.kind == "image" else str(declared.get("output", "residual"))
        try:
            return Preprocessing(size=size, value_range=tuple(declared.get("value_range", (-1.0, 1.0))),
                                 output=output)
        except (ConfigError, TypeError, ValueError) as exc:
            raise UnsupportedError(f"{self.path}: {exc}") from exc


def read_coreml(path: Path | str) -> CoreMLModelFile:
    """Read a ``.mlpackage`` / ``.mlmodel``'s spec and check it is a one-image-in, one-image-out model."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Core ML model {path} does not exist")
    if path.suffix.lower() == ".mlmodel" and path.is_dir():
        raise InputError(f"{path} is a folder; a .mlmodel is a single file")
    if path.suffix.lower() == ".mlpackage" and not path.is_dir():
        raise InputError(f"{path} is not a folder; a .mlpackage is a folder with a Manifest.json")
    ct = import_coremltools()
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as exc:  # noqa: BLE001 - coremltools raises many kinds on a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read Core ML model {path}: {first}") from exc
    kind = spec.WhichOneof("Type")
    if kind == "mlProgram":
        fmt = "mlprogram"
    elif kind in ("neuralNetwork", "neuralNetworkRegressor"):
        fmt = "neuralnetwork"
    else:
        raise UnsupportedError(f"{path} holds a Core ML {kind} model; tbopt runs ML Programs and NeuralNetworks")
    ins, outs = list(spec.description.input), list(spec.description.output)
    if len(ins) != 1 or len(outs) != 1:
        raise UnsupportedError(f"{path} has {len(ins)} inputs and {len(outs)} outputs; tbopt runs models with one "
                               "image (or tensor) in and one out")
    inp, out = _feature(ins[0], "input"), _feature(outs[0], "output")
    if inp.kind == "image" and inp.shape[1] != 3:
        raise UnsupportedError(f"{path}: the input image is {inp.color}; tbopt feeds RGB faces")
    if len(inp.shape) < 3 or inp.shape[-3] != 3 or inp.shape[-1] != inp.shape[-2] or \
            int(np.prod(inp.shape[:-3])) != 1:
        raise UnsupportedError(f"{path}: input {inp.describe()} is not one square 3-channel image")
    user = dict(spec.description.metadata.userDefined)
    weights_dir = getattr(model, "weights_dir", None) if fmt == "mlprogram" else None
    return CoreMLModelFile(path, spec, fmt, inp, out, user, weights_dir)


# ---------------------------------------------------------------- backends

class _Backend:
    """Runs one (1, 3, S, S) example: an image input gets 0..255 RGB pixels, a tensor input the
    model-space values; returns image outputs as 0..255 RGB floats, tensors as they come."""

    engine: str
    notes: list[str]

    def run(self, feed: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class ReferenceBackend(_Backend):
    """The reference executor (:mod:`tinybeauty_cli.coreml_exec`)."""

    def __init__(self, model: CoreMLModelFile, fp16_emulation: bool = False):
        self.model = model
        self.notes = []
        if model.format == "mlprogram":
            from .exec.mlprogram import MLProgramExecutor, load_program

            self.executor: Any = MLProgramExecutor(load_program(model.path), fp16_emulation=fp16_emulation)
            self.precision = self.executor.compute_precision()
            self.scaler = None
            if fp16_emulation and self.precision == "fp32":
                self.notes.append(f"{model.path.name} computes in fp32: --fp16-emulation changes nothing")
        else:
            from .exec.neuralnetwork import NeuralNetworkExecutor, image_scaler

            self.executor = NeuralNetworkExecutor(model.spec, fp16_emulation=fp16_emulation)
            self.precision = "fp16 on GPU / Neural Engine, fp32 on CPU"
            self.scaler = image_scaler(model.spec, model.input.name) if model.input.kind == "image" else None
        emulated = fp16_emulation and self.precision != "fp32"
        self.fp16_emulation = emulated
        self.engine = f"{REFERENCE_ENGINE}, PyTorch fp32" + (" with fp16 rounding after every op" if emulated else "")

    def run(self, feed: np.ndarray) -> np.ndarray:
        inp, out = self.model.input, self.model.output
        t = torch.from_numpy(np.ascontiguousarray(feed, dtype=np.float32))
        if inp.kind == "image":
            if inp.color == "BGR":
                t = t.flip(1)
            if self.scaler is not None:  # NeuralNetwork preprocessing (ML Programs carry it as ops)
                scale, (r, g, b) = self.scaler
                bias = (b, g, r) if inp.color == "BGR" else (r, g, b)
                t = t * scale + torch.tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
        else:
            t = t.reshape(inp.shape)
        y = self.executor.run({inp.name: t})[out.name]
        y = y.float()
        if out.kind == "image":
            y = y.reshape(1, -1, y.shape[-2], y.shape[-1])
            if out.color == "BGR":
                y = y.flip(1)
        return y.numpy()


def load_device_model(path: Path, compute_units: ComputeUnits) -> Any:
    """``coremltools.models.MLModel`` loaded (compiled) for prediction with ``compute_units``."""
    ct = import_coremltools()
    return ct.models.MLModel(str(path), compute_units=compute_units.coreml())


class DeviceBackend(_Backend):
    """Core ML itself (macOS only): ``MLModel.predict`` with the chosen compute units."""

    def __init__(self, model: CoreMLModelFile, compute_units: ComputeUnits):
        self.model = model
        self.notes = []
        self.compute_units = compute_units
        try:
            self.mlmodel = load_device_model(model.path, compute_units)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"Core ML cannot load {model.path}: {exc}") from exc
        self.engine = f"Core ML on device ({compute_units.value})"

    def run(self, feed: np.ndarray) -> np.ndarray:
        from PIL import Image

        inp, out = self.model.input, self.model.output
        if inp.kind == "image":
            value: Any = Image.fromarray(feed[0].transpose(1, 2, 0).astype(np.uint8), "RGB")
        else:
            value = feed.reshape(inp.shape).astype(np.float16 if inp.dtype == "fp16" else np.float32)
        result = self.mlmodel.predict({inp.name: value})[out.name]
        if out.kind == "image":
            return np.asarray(result.convert("RGB"), np.float32).transpose(2, 0, 1)[None]
        return np.asarray(result, np.float32)


# ---------------------------------------------------------------- the runner

@dataclass
class CoreMLRunner(Runner):
    """A Core ML model behind :class:`~tinybeauty_cli.runners.Runner`.

    ``round_image_output`` stores an image output in 8 bits as Core ML does; turn it off
    to compare the graph's arithmetic with a float reference below 8-bit resolution.
    """

    model: CoreMLModelFile
    backend: _Backend
    round_image_output: bool = True
    kind: str = "coreml"
    batch_size: int = 8
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.preprocessing = self.model.preprocessing
        self.engine = self.backend.engine

    def _one(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) model-space input -> residual."""
        lo, hi = self.preprocessing.value_range
        if self.model.input.kind == "image":  # an 8-bit pixel buffer, as the app hands it to Core ML
            feed = np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.float32)
        else:
            feed = x
        y = self.backend.run(feed)
        s = self.preprocessing.size
        if y.size != 3 * s * s:
            raise UnsupportedError(f"{self.model.path}: output {self.model.output.name!r} has shape {y.shape}, "
                                   f"not a 3x{s}x{s} image")
        y = y.reshape(1, 3, s, s)
        if self.model.output.kind == "image":  # 0..255, stored in 8 bits by Core ML
            if self.round_image_output:
                y = np.clip(np.rint(y), 0, 255)
            return y * ((hi - lo) / 255.0) + lo - x
        if self.preprocessing.output == "image":
            return y - x
        return y

    def residual(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        s = self.preprocessing.size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise InputError(f"{self.model.path.name} takes (N, 3, {s}, {s}) batches, got {tuple(x.shape)}")
        return np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))]).astype(np.float32)

    def info(self) -> dict[str, Any]:
        return describe_coreml(self)


def describe_coreml(runner: CoreMLRunner) -> dict[str, Any]:
    """What ``tbopt info`` shows about a Core ML file."""
    m = runner.model
    d: dict[str, Any] = {
        "format": "ML Program (.mlpackage)" if m.format == "mlprogram" else "NeuralNetwork (.mlmodel)",
        "target": f"{m.target} (Core ML spec v{m.spec.specificationVersion})",
        "coreml_input": m.input.describe(),
        "coreml_output": m.output.describe() + (", the made-up image" if m.output.kind == "image" or
                                                runner.preprocessing.output == "image" else ", the residual"),
        "preprocessing": runner.preprocessing.to_dict(),
    }
    reader = runner.backend if isinstance(runner.backend, ReferenceBackend) else None
    if reader is None:  # on device: compile the graph anyway, to list what it holds
        try:
            reader = ReferenceBackend(m)
        except UnsupportedError as exc:
            d["coreml_ops"] = f"not listed ({exc})"
    if reader is not None:
        d["precision"] = reader.precision
        counts = reader.executor.op_counts()
        d["coreml_ops"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        summary = reader.executor.weight_summary()
        stored = summary.get("compressed_tensors") or summary.get("weight_storage") or {}
        d["coreml_weights"] = ", ".join(f"{k} x{v}" for k, v in sorted(stored.items())) or "uncompressed"
        elements = weight_elements(m)
        total, nonzero = int(sum(a.size for a in elements)), int(sum(np.count_nonzero(a) for a in elements))
        d["coreml_stored_values"] = f"{total:,} weight values in {len(elements)} tensors ({nonzero:,} non-zero)"
    tb = m.tbopt_metadata
    if tb.get("history"):
        d["history"] = tb["history"]
    other = {k: v for k, v in m.user_metadata.items() if not (k == "tbopt" or k.startswith("tbopt."))}
    if other or tb:
        d["metadata"] = {**other, **{f"tbopt.{k}": v for k, v in tb.items() if k != "history"}}
    if runner.notes:
        d["notes"] = list(runner.notes)
    return d


def open_coreml_runner(path: Path | str, *, compute_units: str | ComputeUnits | None = None,
                       fp16_emulation: bool = False, round_image_output: bool = True,
                       use_device: bool | None = None, arch: str | None = None, arch_kwargs: str | None = None,
                       trust_pickle: bool = False) -> CoreMLRunner:
    """Open a ``.mlpackage`` / ``.mlmodel`` as a :class:`CoreMLRunner`.

    ``use_device``: None picks Core ML where it can run (macOS) and the reference
    executor elsewhere; False forces the reference executor; True requires Core ML.
    ``arch``, ``arch_kwargs`` and ``trust_pickle`` concern checkpoints and are ignored (a
    Core ML file carries its own graph), so commands can pass one set of options to a mix.
    """
    del arch, arch_kwargs, trust_pickle
    units = parse_compute_units(compute_units)
    model = read_coreml(path)
    device = coreml_available() if use_device is None else use_device
    if device and not coreml_available():
        raise UnsupportedError("Core ML prediction needs macOS with Core ML",
                               hint="off macOS, tbopt runs Core ML models with its reference executor")
    notes: list[str] = []
    if device:
        backend: _Backend = DeviceBackend(model, units or ComputeUnits.all)
        if fp16_emulation:
            notes.append("--fp16-emulation applies to the reference executor; Core ML computes in its own precision")
    else:
        backend = ReferenceBackend(model, fp16_emulation=fp16_emulation)
        if units is not None:
            notes.append(f"--compute-units {units.value} has no effect: Core ML prediction needs macOS, so this run "
                         "uses the reference executor on the CPU")
    notes.extend(backend.notes)
    return CoreMLRunner(model, backend, round_image_output=round_image_output, notes=notes)


# ---------------------------------------------------------------- weights, for comparisons

@dataclass
class StoredTensor:
    """One weight tensor as the file stores it, decompressed to float32."""

    name: str  # the op or layer (and field) it belongs to
    array: np.ndarray
    conv: str | None = None  # "weight" / "bias" of a convolution, else None
    transposed: bool = False  # of a transposed convolution


def stored_tensors(model: CoreMLModelFile) -> list[StoredTensor]:
    """Every weight tensor the file stores, decompressed with coremltools' own code (ML Program:
    float constants of more than one element that feed compute ops; NeuralNetwork: every
    ``WeightParams`` and ``loadConstantND``), in graph order."""
    out: list[StoredTensor] = []
    if model.format == "mlprogram":
        from .exec.mlprogram import load_program, materialize_constants

        fn = load_program(model.path).functions["main"]
        consts = materialize_constants(fn)
        seen: set[str] = set()
        for op in fn.operations:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            is_conv = op.op_type in ("conv", "conv_transpose")
            for key, inp in op.inputs.items():
                for v in inp if isinstance(inp, (list, tuple)) else (inp,):
                    val = consts.get(v.name) if v is not None else None
                    if not (isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size > 1) or v.name in seen:
                        continue
                    seen.add(v.name)
                    role = key if is_conv and key in ("weight", "bias") else None
                    out.append(StoredTensor(f"{op.name}.{key}", np.asarray(val, np.float32), role,
                                            op.op_type == "conv_transpose"))
        return out
    from .exec.neuralnetwork import network_of, weight_array

    for layer in network_of(model.spec).layers:
        kind = layer.WhichOneof("layer")
        p = getattr(layer, kind)
        if kind == "convolution":
            kh, kw = list(p.kernelSize)
            groups = int(p.nGroups) or 1
            shape = ((p.kernelChannels, p.outputChannels // groups, kh, kw) if p.isDeconvolution
                     else (p.outputChannels, p.kernelChannels, kh, kw))
            out.append(StoredTensor(f"{layer.name}.weights", weight_array(
                p.weights, shape, axis=1 if p.isDeconvolution else 0), "weight", bool(p.isDeconvolution)))
            if p.hasBias:
                out.append(StoredTensor(f"{layer.name}.bias", weight_array(p.bias, (p.outputChannels,)), "bias",
                                        bool(p.isDeconvolution)))
        elif kind == "batchnorm":
            fields = ("gamma", "beta") + (() if p.computeMeanVar else ("mean", "variance"))
            out.extend(StoredTensor(f"{layer.name}.{f}", weight_array(getattr(p, f), (p.channels,)))
                       for f in fields)
        elif kind == "loadConstantND":
            arr = weight_array(p.data, [int(s) for s in p.shape])
            if arr.size > 1:
                out.append(StoredTensor(f"{layer.name}.data", arr))
    return out


def weight_elements(model: CoreMLModelFile) -> list[np.ndarray]:
    return [t.array for t in stored_tensors(model)]


@dataclass
class ConvWeights:
    """The decompressed weight and bias of one (transposed) convolution, in graph order."""

    name: str
    transposed: bool
    weight: np.ndarray
    bias: np.ndarray | None


def conv_weights(path: Path | str) -> list[ConvWeights]:
    """Every convolution's weights as the file stores them (decompressed), in graph order."""
    return _conv_pairs(stored_tensors(read_coreml(path)))


def _conv_pairs(tensors: Sequence[StoredTensor]) -> list[ConvWeights]:
    convs: list[ConvWeights] = []
    for t in tensors:
        if t.conv == "weight":
            convs.append(ConvWeights(t.name.rsplit(".", 1)[0], t.transposed, t.array, None))
        elif t.conv == "bias":
            convs[-1].bias = t.array
    return convs


def with_file_weights(module: nn.Module, path: Path | str, size: int, max_relative_error: float = 0.5) -> nn.Module:
    """``module`` (changed in place) carrying the weights a Core ML file really holds: the PyTorch
    twin a compressed export is compared with -- same arithmetic, the file's decompressed weights.

    Convolutions get the file's convolutions in the order a forward pass runs them (kinds and
    shapes checked). Every other parameter takes the stored tensor with as many elements that
    is closest to it (e.g. a LayerNorm gamma a NeuralNetwork quantizer also compressed), when
    one is within ``max_relative_error``; parameters the file folded away keep their values.
    BatchNorm folded into a convolution by the converter must be folded in ``module`` first.
    """
    tensors = stored_tensors(read_coreml(path))
    convs = _conv_pairs(tensors)
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    if len(order) != len(convs):
        raise UnsupportedError(f"the model runs {len(order)} convolutions, the Core ML file has {len(convs)}")
    taken: set[int] = set()
    with torch.no_grad():
        for layer, cw in zip(order, convs):
            if isinstance(layer, nn.ConvTranspose2d) != cw.transposed or tuple(layer.weight.shape) != cw.weight.shape:
                raise UnsupportedError(f"convolution {cw.name!r} {cw.weight.shape} does not match {layer} "
                                       f"{tuple(layer.weight.shape)}")
            layer.weight.copy_(torch.from_numpy(cw.weight))
            taken.add(id(layer.weight))
            if cw.bias is not None:
                if layer.bias is None:
                    raise UnsupportedError(f"convolution {cw.name!r} has a bias, {layer} has none")
                layer.bias.copy_(torch.from_numpy(cw.bias))
                taken.add(id(layer.bias))
        others = [t.array.reshape(-1) for t in tensors if t.conv is None]
        for param in module.parameters():
            if id(param) in taken or not param.is_floating_point():
                continue
            flat = param.detach().reshape(-1).numpy()
            norm = max(float(np.linalg.norm(flat)), 1e-12)
            errors = [(float(np.linalg.norm(a - flat)) / norm, i) for i, a in enumerate(others) if a.size == flat.size]
            if errors:
                err, i = min(errors)
                if err <= max_relative_error:
                    param.copy_(torch.from_numpy(others[i]).reshape(param.shape))
    return module




__all__: Sequence[str] = (
    "REFERENCE_ENGINE", "ComputeUnits", "CoreMLModelFile", "CoreMLRunner", "ConvWeights", "Feature",
    "coreml_available", "conv_weights", "import_coremltools", "open_coreml_runner", "read_coreml",
    "stored_tensors", "weight_elements", "with_file_weights",
)
