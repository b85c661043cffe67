"""The weights a Core ML file stores, decompressed as Core ML computes with them, and the PyTorch
twin that carries them.

:func:`stored_weights` is the one reader of a file's weights for comparisons: every float
tensor an op or layer computes with, decompressed by coremltools' own code (ML Program: the
``materialized_val_inference`` of each ``constexpr_*`` op, so palettes are looked up, int8
scaled and sparse tensors expanded; NeuralNetwork: the inverse of ``quantize_weights``), with
how the file stores it. (The reference executors decode weights on their own, to run a graph.)

:func:`carry_file_weights` gives a PyTorch module the weights the file holds: the twin a
compressed file is compared with -- the same arithmetic, the file's decompressed weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import UnsupportedError
from .spec import constexpr_values, coremltools, load_program, load_spec

_CONV_KINDS = ("conv", "conv_transpose", "convolution")


@dataclass
class StoredWeight:
    """One weight tensor of a Core ML file, as Core ML computes with it."""

    op: str  # the op (ML Program) or layer (NeuralNetwork) that reads it
    kind: str  # that op's type or layer's kind: "conv", "conv_transpose", "convolution", "batchnorm", ...
    field: str  # which of its inputs: "weight", "bias", "gamma", ...
    value: np.ndarray  # float32, decompressed
    storage: str  # "fp16", "fp32", "palettized 4-bit", "int8 linear", "sparse+palettized 4-bit", "linear 8-bit", ...
    transposed: bool = False  # read by a transposed convolution

    @property
    def name(self) -> str:
        return f"{self.op}.{self.field}"

    @property
    def conv(self) -> str | None:
        """"weight" or "bias" of a (transposed) convolution, else None."""
        if self.kind not in _CONV_KINDS:
            return None
        return {"weight": "weight", "weights": "weight", "bias": "bias"}.get(self.field)


def stored_weights(path: Path | str, spec: Any = None) -> list[StoredWeight]:
    """Every float tensor (rank >= 1) the ops or layers of a ``.mlpackage`` / ``.mlmodel`` compute
    with, decompressed to float32, in graph order (a tensor read by several ops: once, at the first).
    ``spec``: a ``.mlmodel``'s spec already read (its weights are in it)."""
    path = Path(path)
    if path.suffix.lower() == ".mlpackage":
        return _program_weights(path)
    return _neural_network_weights(spec if spec is not None else load_spec(path))


# ---------------------------------------------------------------- ML Program

def _linear_label(op: Any) -> str:
    """"int8 linear", "int4 linear per-block", ...: the integer type and whether the scales are per
    output channel or per block (more than one axis of the scale larger than one)."""
    from coremltools.converters.mil.mil import types  # noqa: PLC0415

    data = next((op.inputs[k] for k in ("quantized_data", "data", "nonzero_data") if op.inputs.get(k) is not None), None)
    dtype = types.builtin_to_string(data.dtype) if data is not None else "int8"
    scale = op.inputs.get("scale")
    blocks = sum(1 for d in (scale.shape if scale is not None else ()) if d != 1)
    return f"{dtype} linear" + (" per-block" if blocks > 1 else "")


def _float_data(op: Any) -> bool:
    from coremltools.converters.mil.mil import types  # noqa: PLC0415

    data = op.inputs.get("data")
    return data is not None and types.is_float(data.dtype)


def _storage_of(op: Any) -> str:
    """How a decompressed weight is stored, from the chain of constexpr ops that produce it:
    "palettized 4-bit", "palettized 4-bit (6 tables)" (per group of channels), "+per-channel
    scale", "int8 linear", "int4 linear per-block", "sparse+...", ..."""
    kinds: list[str] = []
    pending = [op]
    while pending:
        cur = pending.pop()
        t = cur.op_type
        lut = cur.inputs.get("lut")
        inner = [v.op for v in cur.inputs.values()
                 if v is not None and v.op is not None and v.op.op_type.startswith("constexpr_")]
        if lut is not None:
            entries = lut.shape[0] if lut.rank == 1 else lut.shape[-2]
            tables = int(np.prod(lut.shape[:-2])) if lut.rank > 2 else 1
            kinds.append(f"palettized {int(np.log2(entries))}-bit" + (f" ({tables} tables)" if tables > 1 else ""))
        elif "shift_scale" in t and _float_data(cur):
            kinds.append("per-channel scale")  # float tables or weights scaled, not integers dequantized
        elif "affine_dequantize" in t or "shift_scale" in t:
            kinds.append(_linear_label(cur))
        if "sparse" in t:
            kinds.append("sparse")
        pending.extend(inner)
    return "+".join(sorted(dict.fromkeys(kinds), key=lambda k: (k != "sparse", k == "per-channel scale")))


def _is_data(op: Any) -> bool:
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def _stored_value(var: Any, decompressed: dict[str, Any]) -> tuple[Any, str | None]:
    """The value of a ``const`` / ``constexpr_*`` output and its storage (None: the value's own dtype)."""
    if var.op.op_type == "const":
        return var.val, None
    return decompressed[var.name], _storage_of(var.op)


def _program_weights(path: Path) -> list[StoredWeight]:
    fn = load_program(path).functions["main"]
    decompressed = constexpr_values(fn)
    weights: list[StoredWeight] = []
    seen: set[str] = set()
    for op in fn.operations:
        if _is_data(op):
            continue
        for key, inp in op.inputs.items():
            for var in inp if isinstance(inp, (list, tuple)) else (inp,):
                if var is None or var.op is None or not _is_data(var.op) or var.name in seen:
                    continue
                seen.add(var.name)
                value, storage = _stored_value(var, decompressed)
                if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim == 0:
                    continue
                weights.append(StoredWeight(op.name, op.op_type, key, value.astype(np.float32),
                                            storage or str(value.dtype).replace("float", "fp"),
                                            op.op_type == "conv_transpose"))
    return weights


# ---------------------------------------------------------------- NeuralNetwork

def _weight_param_value(wp: Any, shape: tuple[int, ...], axis: int = 0) -> tuple[np.ndarray, str] | None:
    """A NeuralNetwork WeightParams as float32 of ``shape`` and how it is stored."""
    if len(wp.floatValue):
        return np.asarray(wp.floatValue, np.float32).reshape(shape), "fp32"
    if len(wp.float16Value):
        return np.frombuffer(wp.float16Value, np.float16).astype(np.float32).reshape(shape), "fp16"
    if len(wp.rawValue) and wp.HasField("quantization"):
        from coremltools.models.neural_network import quantization_utils as qu  # noqa: PLC0415

        copy = type(wp)()
        copy.CopyFrom(wp)
        qu._dequantize_wp(copy, shape, axis)  # coremltools' own inverse of quantize_weights
        q = wp.quantization
        kind = ("linear" if q.WhichOneof("QuantizationType") == "linearQuantization" else "palettized")
        return np.asarray(copy.floatValue, np.float32).reshape(shape), f"{kind} {q.numberOfBits}-bit"
    return None


def _neural_network_weights(spec: Any) -> list[StoredWeight]:
    coremltools()
    weights: list[StoredWeight] = []

    def add(layer: Any, kind: str, field: str, wp: Any, shape: tuple[int, ...], axis: int = 0,
            transposed: bool = False) -> None:
        got = _weight_param_value(wp, shape, axis)
        if got is not None:
            weights.append(StoredWeight(layer.name, kind, field, got[0], got[1], transposed))

    for layer in getattr(spec, spec.WhichOneof("Type")).layers:
        kind = layer.WhichOneof("layer")
        p = getattr(layer, kind)
        if kind == "convolution":
            kh, kw = p.kernelSize
            deconv = bool(p.isDeconvolution)
            if deconv:
                shape = (p.kernelChannels, p.outputChannels // (int(p.nGroups) or 1), kh, kw)
                add(layer, kind, "weights", p.weights, shape, axis=1, transposed=True)
            else:
                add(layer, kind, "weights", p.weights, (p.outputChannels, p.kernelChannels, kh, kw))
            if p.hasBias:
                add(layer, kind, "bias", p.bias, (p.outputChannels,), transposed=deconv)
        elif kind == "innerProduct":
            add(layer, kind, "weights", p.weights, (p.outputChannels, p.inputChannels))
            if p.hasBias:
                add(layer, kind, "bias", p.bias, (p.outputChannels,))
        elif kind == "batchnorm":
            for field in ("gamma", "beta", "mean", "variance"):
                add(layer, kind, field, getattr(p, field), (p.channels,))
        elif kind in ("loadConstantND", "loadConstant"):
            add(layer, kind, "data", p.data, tuple(int(s) for s in p.shape))
        elif kind == "scale":
            add(layer, kind, "scale", p.scale, tuple(int(s) for s in p.shapeScale))
            if p.hasBias:
                add(layer, kind, "bias", p.bias, tuple(int(s) for s in p.shapeBias))
        elif kind == "bias":
            add(layer, kind, "bias", p.bias, tuple(int(s) for s in p.shape))
    return weights


# ---------------------------------------------------------------- the PyTorch twin

@dataclass
class WeightMatch:
    """Which stored tensor each float tensor of a module takes, its relative error (the compression
    error) and how the file stores it; by the module's parameter and buffer names."""

    values: dict[str, torch.Tensor]
    relative_error: dict[str, float]
    storage: dict[str, str]
    #: Tensors the converter changed beyond what their storage explains (it folded an op of the graph,
    #: such as a scale after a convolution, into them): with these, the twin is not the file's function.
    rewritten: list[str] = field(default_factory=list)


def float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Float parameters and buffers of rank >= 1 (what a Core ML file of ``module`` must hold)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and t.dim() >= 1:
            out[name] = t.detach()
    return out


def layers_in_run_order(module: nn.Module, example: torch.Tensor,
                        kinds: tuple[type, ...] = (nn.modules.conv._ConvNd,)) -> list[nn.Module]:
    """The layers of ``module`` of ``kinds`` (default: (transposed) convolutions) in the order a
    forward pass first runs them: the order of the file's graph."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod) if mod not in order else None)
             for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return order


def _relative_error(stored: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(stored.reshape(target.shape) - target)) / max(float(np.linalg.norm(target)), 1e-12)


#: Relative error an uncompressed (fp16/fp32) tensor may have: fp16 rounding is about 5e-4.
_EXACT_STORAGE_ERROR = 1e-2


def _rewritten(stored: np.ndarray, target: np.ndarray, storage: str) -> bool:
    """Whether the converter changed ``target`` beyond what its ``storage`` explains.

    An uncompressed tensor must match closely. A compressed one may be far off (2-bit palettes), but
    compression error is noise that no rescaling removes, while an op folded into the tensor (a scale
    after a convolution, a norm) is a per-channel rescaling: if the best per-channel scale of ``target``
    is much closer to the stored tensor than ``target`` itself, the converter rescaled it.
    """
    t = target.reshape(target.shape[0], -1).astype(np.float64)
    v = stored.reshape(t.shape).astype(np.float64)
    raw = _relative_error(v, t)
    if storage in ("fp16", "fp32"):
        return raw > _EXACT_STORAGE_ERROR
    scale = (v * t).sum(1) / np.maximum((t * t).sum(1), 1e-24)
    fitted = _relative_error(v, t * scale[:, None])
    return raw > 3 * fitted + _EXACT_STORAGE_ERROR


def match_weights(module: nn.Module, weights: list[StoredWeight], example: torch.Tensor) -> WeightMatch:
    """Pair every float tensor of ``module`` with the stored tensor that holds it.

    Core ML files do not keep PyTorch's names. Convolutions are paired by position: the file's
    in graph order with ``module``'s in the order a forward pass on ``example`` runs them (kinds
    and shapes checked), so even coarse palettes cannot be mistaken for another layer's.
    Every other tensor takes the stored tensor of its size closest to it: compression error
    (fp16, int8, palettes) is far smaller than the distance between two different tensors, so a
    parameter whose best match is not clearly better than the runner-up is an error; so is one
    the file does not hold, unless it is all zeros or all ones (a no-op the converter drops).
    BatchNorm folded into a convolution by the converter must be folded in ``module`` first.
    """
    params = float_tensors(module)
    name_of = {id(t): name for name, t in list(module.named_parameters()) + list(module.named_buffers())}
    values: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    storage: dict[str, str] = {}

    def take(name: str, w: StoredWeight) -> None:
        target = params[name].float().numpy()
        values[name] = torch.from_numpy(w.value.reshape(target.shape).copy())
        errors[name] = _relative_error(w.value, target)
        storage[name] = w.storage

    convs: list[list[StoredWeight | None]] = []
    for w in weights:
        if w.conv == "weight":
            convs.append([w, None])
        elif w.conv == "bias" and convs and convs[-1][0].op == w.op:
            convs[-1][1] = w
    layers = layers_in_run_order(module, example)
    if len(layers) != len(convs):
        raise UnsupportedError(f"the model runs {len(layers)} convolutions, the Core ML file has {len(convs)}")
    for layer, (weight, bias) in zip(layers, convs):
        transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        if transposed != weight.transposed or tuple(layer.weight.shape) != weight.value.shape:
            raise UnsupportedError(f"convolution {weight.op!r} {weight.value.shape} does not match {layer} "
                                   f"{tuple(layer.weight.shape)}")
        take(name_of[id(layer.weight)], weight)
        if bias is not None:
            if layer.bias is None:
                raise UnsupportedError(f"convolution {weight.op!r} has a bias, {layer} has none")
            take(name_of[id(layer.bias)], bias)

    by_size: dict[int, list[StoredWeight]] = {}
    for w in weights:
        if w.conv is None:
            by_size.setdefault(w.value.size, []).append(w)
    missing = []
    for name, p in params.items():
        if name in values:
            continue
        target = p.float().numpy()
        scored = sorted(((_relative_error(w.value, target), i, w) for i, w in enumerate(by_size.get(target.size, []))),
                        key=lambda s: s[:2])
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
                raise UnsupportedError(f"cannot tell which tensor of the Core ML file holds {name}: "
                                       f"{best.name} and {other.name} are both close to it")
            break
        take(name, best)
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise UnsupportedError(f"the Core ML file holds no tensor matching {shown}: the converter merged "
                               f"them into other operations, so no PyTorch model carries its exact weights")
    rewritten = [k for k in params if storage[k] != "folded away (no-op)" and params[k].dim() >= 1
                 and _rewritten(values[k].numpy(), params[k].float().numpy(), storage[k])]
    return WeightMatch({k: values[k] for k in params}, {k: errors[k] for k in params},
                       {k: storage[k] for k in params}, rewritten)


def carry_file_weights(module: nn.Module, weights: list[StoredWeight], example: torch.Tensor) -> WeightMatch:
    """Load into ``module`` (in place) the weights the file holds (see :func:`match_weights`): the
    PyTorch twin of the file, the same function in fp32 with the file's decompressed weights."""
    match = match_weights(module, weights, example)
    module.load_state_dict(match.values, strict=False)
    return match
