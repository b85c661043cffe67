"""The MIL ops the ML Program reference executor evaluates: for each op type, a builder that turns
one op into a PyTorch call with its constant operands bound, following the MIL op definitions
(``coremltools.converters.mil.mil.ops.defs``). :data:`OPS` maps op types to builders.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import UnsupportedError
from .graph import as_tensor

Builder = Callable[[Any, "Ctx"], tuple[Callable[..., Any], list[Any]]]
OPS: dict[str, Builder] = {}

#: Ops whose value is data, not computation: skipped by the compiler.
CONST_OPS = ("const",)


def _op(*names: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        for n in names:
            OPS[n] = fn
        return fn
    return register


def dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(var.dtype)
    except Exception:  # noqa: BLE001 - lists, tuples and states have no scalar dtype
        return str(var.dtype)


class Ctx:
    """What a builder may ask about an op's operands while compiling."""

    def __init__(self, consts: dict[str, Any], op: Any):
        self.consts = consts
        self.op = op

    def is_const(self, var: Any) -> bool:
        return var is not None and var.name in self.consts

    def value(self, var: Any, what: str) -> Any:
        if var is None:
            return None
        if var.name not in self.consts:
            raise UnsupportedError(f"{self.op.op_type} {self.op.name!r}: a non-constant {what} is not supported "
                                   "by the reference executor")
        return self.consts[var.name]

    def param(self, name: str, default: Any = None) -> Any:
        """A constant parameter of the op, as numpy/Python (``default`` when absent)."""
        var = getattr(self.op, name, None)
        if var is None:
            return default
        v = self.value(var, name)
        if isinstance(v, np.ndarray) and v.ndim == 0:
            return v.item()
        if isinstance(v, np.generic):
            return v.item()
        return v

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        v = self.param(name)
        if v is None:
            return None if default is None else list(default)
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def tensor(self, name: str) -> torch.Tensor | None:
        var = getattr(self.op, name, None)
        if var is None:
            return None
        return as_tensor(self.value(var, name))

    def static_shape(self, var: Any) -> tuple[int, ...] | None:
        shape = var.shape
        if shape is None or not all(isinstance(d, (int, np.integer)) for d in shape):
            return None
        return tuple(int(d) for d in shape)


# ---------------------------------------------------------------- elementwise

def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Builder:
    return lambda op, c: (fn, [op.x])


_UNARY = {
    "abs": torch.abs, "acos": torch.acos, "asin": torch.asin, "atan": torch.atan, "atanh": torch.atanh,
    "ceil": torch.ceil, "cos": torch.cos, "cosh": torch.cosh, "erf": torch.erf, "exp": torch.exp,
    "exp2": torch.exp2, "floor": torch.floor, "round": torch.round, "sign": torch.sign, "sin": torch.sin,
    "sinh": torch.sinh, "sqrt": torch.sqrt, "square": torch.square, "tan": torch.tan, "tanh": torch.tanh,
    "relu": torch.relu, "relu6": F.relu6, "sigmoid": torch.sigmoid, "silu": F.silu, "softplus": F.softplus,
    "softsign": F.softsign, "logical_not": torch.logical_not, "identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


def _with_epsilon(fn, default: float):
    """A unary op of ``x + epsilon`` (MIL's default epsilon when the op does not set one)."""
    def make(op, c):
        eps = float(c.param("epsilon", default))
        return (lambda x: fn(x + eps)), [op.x]
    return make


for _name, (_fn, _eps) in {"rsqrt": (torch.rsqrt, 1e-12), "inverse": (torch.reciprocal, 1e-4),
                           "log": (torch.log, 1e-45)}.items():
    OPS[_name] = _with_epsilon(_fn, _eps)


@_op("clip")
def _clip(op, c):
    lo, hi = float(c.param("alpha")), float(c.param("beta"))
    return (lambda x: torch.clamp(x, lo, hi)), [op.x]


@_op("threshold")
def _threshold(op, c):
    a = float(c.param("alpha"))
    return (lambda x: torch.clamp(x, min=a)), [op.x]


@_op("leaky_relu")
def _leaky_relu(op, c):
    a = float(c.param("alpha", 0.01))
    return (lambda x: F.leaky_relu(x, a)), [op.x]


@_op("elu")
def _elu(op, c):
    a = float(c.param("alpha", 1.0))
    return (lambda x: F.elu(x, a)), [op.x]


@_op("gelu")
def _gelu(op, c):
    mode = c.param("mode", "EXACT")
    if mode == "EXACT":
        return F.gelu, [op.x]
    if mode == "TANH_APPROXIMATION":
        return (lambda x: F.gelu(x, approximate="tanh")), [op.x]
    if mode == "SIGMOID_APPROXIMATION":
        return (lambda x: x * torch.sigmoid(1.702 * x)), [op.x]
    raise UnsupportedError(f"gelu {op.name!r}: mode {mode!r} is not supported")


@_op("sigmoid_hard")
def _sigmoid_hard(op, c):
    a, b = float(c.param("alpha", 0.2)), float(c.param("beta", 0.5))
    return (lambda x: torch.clamp(a * x + b, 0.0, 1.0)), [op.x]


@_op("scaled_tanh")
def _scaled_tanh(op, c):
    a, b = float(c.param("alpha", 1.0)), float(c.param("beta", 1.0))
    return (lambda x: a * torch.tanh(b * x)), [op.x]


@_op("linear_activation")
def _linear_activation(op, c):
    a, b = float(c.param("alpha")), float(c.param("beta", 0.0))
    return (lambda x: a * x + b), [op.x]


@_op("clamped_relu")
def _clamped_relu(op, c):
    a, b = float(c.param("alpha", 0.0)), float(c.param("beta", 6.0))
    return (lambda x: torch.where(x >= 0, torch.clamp(x, max=b), torch.clamp(a * x, max=b))), [op.x]


@_op("thresholded_relu")
def _thresholded_relu(op, c):
    a = float(c.param("alpha", 1.0))
    return (lambda x: torch.where(x >= a, x, torch.zeros_like(x))), [op.x]


@_op("prelu")
def _prelu(op, c):
    alpha = c.tensor("alpha")
    return (lambda x: F.prelu(x, alpha)), [op.x]


@_op("softmax")
def _softmax(op, c):
    axis = int(c.param("axis", -1))
    return (lambda x: torch.softmax(x, dim=axis)), [op.x]


_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.true_divide, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "floor_div": torch.floor_divide, "mod": torch.remainder,
    "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt, "less_equal": torch.le, "greater": torch.gt,
    "greater_equal": torch.ge, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Builder:
    def build(op, c):
        if c.is_const(op.y) and not c.is_const(op.x):  # bind the constant: one slot read less per call
            k = as_tensor(c.consts[op.y.name])
            return (lambda x: fn(x, k)), [op.x]
        return fn, [op.x, op.y]
    return build


for _name, _fn in _BINARY.items():
    OPS[_name] = _binary(_fn)


@_op("select")
def _select(op, c):
    return torch.where, [op.cond, op.a, op.b]


@_op("cast")
def _cast(op, c):
    dtype = c.param("dtype")
    if dtype in ("fp32", "fp16", "fp64"):
        return (lambda x: x.to(torch.float32)), [op.x]
    if dtype in ("int32", "int16", "int8", "uint8", "uint16", "int64"):
        return (lambda x: x.to(torch.int64)), [op.x]  # float -> int truncates, as numpy's astype does
    if dtype == "bool":
        return (lambda x: x != 0), [op.x]
    raise UnsupportedError(f"cast {op.name!r}: dtype {dtype!r} is not supported")


# ---------------------------------------------------------------- reductions

def _axes(c: Ctx) -> list[int] | None:
    return c.ints("axes")


def _reduce(kind: str) -> Builder:
    def build(op, c):
        axes = _axes(c)
        keep = bool(c.param("keep_dims", False))
        rank = op.x.rank

        def dims() -> list[int]:
            return list(range(rank)) if axes is None else axes

        d = dims()
        if kind == "mean":
            return (lambda x: torch.mean(x, dim=d, keepdim=keep)), [op.x]
        if kind == "sum":
            return (lambda x: torch.sum(x, dim=d, keepdim=keep)), [op.x]
        if kind == "max":
            return (lambda x: torch.amax(x, dim=d, keepdim=keep)), [op.x]
        if kind == "min":
            return (lambda x: torch.amin(x, dim=d, keepdim=keep)), [op.x]
        if kind == "sum_square":
            return (lambda x: torch.sum(x * x, dim=d, keepdim=keep)), [op.x]
        if kind == "l1_norm":
            return (lambda x: torch.sum(torch.abs(x), dim=d, keepdim=keep)), [op.x]
        if kind == "l2_norm":
            return (lambda x: torch.sqrt(torch.sum(x * x, dim=d, keepdim=keep))), [op.x]
        if kind == "log_sum":
            return (lambda x: torch.log(torch.sum(x, dim=d, keepdim=keep))), [op.x]
        if kind == "log_sum_exp":
            return (lambda x: torch.logsumexp(x, dim=d, keepdim=keep)), [op.x]
        if kind == "prod":
            def prod(x: torch.Tensor) -> torch.Tensor:
                for a in d:
                    x = torch.prod(x, dim=a, keepdim=True)
                return x if keep else torch.squeeze(x, dim=tuple(d))
            return prod, [op.x]
        raise AssertionError(kind)  # pragma: no cover
    return build


for _kind in ("mean", "sum", "max", "min", "sum_square", "l1_norm", "l2_norm", "log_sum", "log_sum_exp", "prod"):
    OPS[f"reduce_{_kind}"] = _reduce(_kind)


# ---------------------------------------------------------------- convolution and pooling

def _same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               lower: bool) -> list[tuple[int, int]]:
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        pads.append((total - small, small) if lower else (small, total - small))
    return pads


def _pads(op: Any, c: Ctx, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[tuple[int, int]]:
    nd = len(kernel)
    pad_type = c.param("pad_type", "valid")
    if pad_type == "valid":
        return [(0, 0)] * nd
    if pad_type == "custom":
        p = c.ints("pad", [0] * (2 * nd))
        return [(p[2 * i], p[2 * i + 1]) for i in range(nd)]
    if pad_type in ("same", "same_lower"):
        shape = c.static_shape(op.x)
        if shape is None:
            raise UnsupportedError(f"{op.op_type} {op.name!r}: 'same' padding on a flexible input shape")
        return _same_pads(shape[2:], kernel, strides, dilations, lower=pad_type == "same_lower")
    raise UnsupportedError(f"{op.op_type} {op.name!r}: pad_type {pad_type!r} is not supported")


def _flat_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    """Per spatial dim (begin, end), first dim first -> F.pad's order (last dim first)."""
    return [v for p in reversed(pads) for v in p]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_params(c, nd: int) -> tuple[list[int], list[int], int]:
    """strides, dilations and groups of a conv or conv_transpose (MIL's defaults: 1)."""
    return c.ints("strides", [1] * nd), c.ints("dilations", [1] * nd), int(c.param("groups", 1))


def _conv_weights(op, c, table: dict) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """weight, bias and spatial dimensions of a conv or conv_transpose whose dimensions ``table`` has."""
    w, b = c.tensor("weight"), c.tensor("bias")
    nd = w.dim() - 2
    if nd not in table:
        raise UnsupportedError(f"{op.op_type} {op.name!r}: {nd}-d convolution is not supported")
    return w, b, nd


@_op("conv")
def _conv(op, c):
    w, b, nd = _conv_weights(op, c, _CONV)
    strides, dil, groups = _conv_params(c, nd)
    pads = _pads(op, c, w.shape[2:], strides, dil)
    conv = _CONV[nd]
    if all(a == e for a, e in pads):
        padding = tuple(a for a, _ in pads)
        return (lambda x: conv(x, w, b, strides, padding, dil, groups)), [op.x]
    flat = _flat_pads(pads)
    return (lambda x: conv(F.pad(x, flat), w, b, strides, 0, dil, groups)), [op.x]


@_op("conv_transpose")
def _conv_transpose(op, c):
    w, b, nd = _conv_weights(op, c, _CONV_T)
    strides, dil, groups = _conv_params(c, nd)
    pad_type = c.param("pad_type", "valid")
    if pad_type == "valid":
        pads = [(0, 0)] * nd
    elif pad_type == "custom":
        p = c.ints("pad", [0] * (2 * nd))
        pads = [(p[2 * i], p[2 * i + 1]) for i in range(nd)]
    else:  # where 'same' puts the odd cropped pixel is not pinned down by the spec: refuse, don't guess
        raise UnsupportedError(f"conv_transpose {op.name!r}: pad_type {pad_type!r} is not supported")
    in_shape = c.static_shape(op.x)
    if getattr(op, "output_shape", None) is not None:
        want = c.ints("output_shape")
        if in_shape is None:
            raise UnsupportedError(f"conv_transpose {op.name!r}: output_shape with a flexible input shape")
        got = [(n - 1) * s + (k - 1) * d + 1 - a - e
               for n, s, k, d, (a, e) in zip(in_shape[2:], strides, w.shape[2:], dil, pads)]
        if list(want[2:]) != got:
            raise UnsupportedError(f"conv_transpose {op.name!r}: an output_shape {want} that differs from the "
                                   f"padded result {got} is not supported")
    convt = _CONV_T[nd]
    if all(a == e for a, e in pads):
        padding = tuple(a for a, _ in pads)
        return (lambda x: convt(x, w, b, strides, padding, 0, groups, dil)), [op.x]

    def crop(x: torch.Tensor) -> torch.Tensor:
        y = convt(x, w, b, strides, 0, 0, groups, dil)
        index = [slice(None), slice(None)] + [slice(a, y.shape[2 + i] - e) for i, (a, e) in enumerate(pads)]
        return y[tuple(index)]
    return crop, [op.x]


def _pool(kind: str) -> Builder:
    def build(op, c):
        kernel = c.ints("kernel_sizes")
        nd = len(kernel)
        strides = c.ints("strides", [1] * nd)
        pads = _pads(op, c, kernel, strides, [1] * nd)
        ceil = bool(c.param("ceil_mode", False))
        if nd != 2:
            raise UnsupportedError(f"{op.op_type} {op.name!r}: {nd}-d pooling is not supported")
        symmetric = all(a == e for a, e in pads) and all(a <= k // 2 for (a, _), k in zip(pads, kernel))
        if kind == "max":
            if symmetric:
                padding = tuple(a for a, _ in pads)
                return (lambda x: F.max_pool2d(x, kernel, strides, padding, ceil_mode=ceil)), [op.x]
            flat = _flat_pads(pads)
            return (lambda x: F.max_pool2d(F.pad(x, flat, value=-math.inf), kernel, strides, 0,
                                           ceil_mode=ceil)), [op.x]
        exclude = bool(c.param("exclude_padding_from_average", False))
        if not symmetric:
            raise UnsupportedError(f"avg_pool {op.name!r}: asymmetric padding is not supported")
        padding = tuple(a for a, _ in pads)
        return (lambda x: F.avg_pool2d(x, kernel, strides, padding, ceil_mode=ceil,
                                       count_include_pad=not exclude)), [op.x]
    return build


OPS["max_pool"] = _pool("max")
OPS["avg_pool"] = _pool("avg")


@_op("linear")
def _linear(op, c):
    w, b = c.tensor("weight"), c.tensor("bias")
    return (lambda x: F.linear(x, w, b)), [op.x]


@_op("matmul")
def _matmul(op, c):
    tx, ty = bool(c.param("transpose_x", False)), bool(c.param("transpose_y", False))

    def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.transpose(-1, -2) if tx else x, y.transpose(-1, -2) if ty else y)
    return mm, [op.x, op.y]


# ---------------------------------------------------------------- normalization

@_op("instance_norm")
def _instance_norm(op, c):
    g, b = c.tensor("gamma"), c.tensor("beta")
    eps = float(c.param("epsilon", 1e-5))
    return (lambda x: F.instance_norm(x, weight=g, bias=b, eps=eps)), [op.x]


@_op("batch_norm")
def _batch_norm(op, c):
    mean, var = c.tensor("mean"), c.tensor("variance")
    g, b = c.tensor("gamma"), c.tensor("beta")
    eps = float(c.param("epsilon", 1e-5))
    return (lambda x: F.batch_norm(x, mean, var, g, b, False, 0.0, eps)), [op.x]


@_op("layer_norm")
def _layer_norm(op, c):
    rank = op.x.rank
    axes = c.ints("axes")
    axes = list(range(rank)) if axes is None else sorted(a % rank for a in axes)
    g, b = c.tensor("gamma"), c.tensor("beta")
    eps = float(c.param("epsilon", 1e-5))
    shape = c.static_shape(op.x)
    if axes == list(range(rank - len(axes), rank)) and shape is not None:
        normalized = shape[rank - len(axes):]
        return (lambda x: F.layer_norm(x, normalized, g, b, eps)), [op.x]
    # gamma/beta have the shape of the normalized axes; broadcast them over the rest
    view = [1] * rank

    def bshape(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        v = list(view)
        for a, n in zip(axes, t.shape):
            v[a] = n
        return t.reshape(v)
    gb, bb = bshape(g), bshape(b)

    def ln(x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=axes, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
        if gb is not None:
            y = y * gb
        if bb is not None:
            y = y + bb
        return y
    return ln, [op.x]


# ---------------------------------------------------------------- tensor layout

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}


@_op("pad")
def _pad(op, c):
    p = c.ints("pad")
    mode = c.param("mode", "constant")
    if mode not in _PAD_MODES:
        raise UnsupportedError(f"pad {op.name!r}: mode {mode!r} is not supported")
    value = float(c.param("constant_val", 0.0))
    pairs = [(p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]  # for the last len(p)/2 dims
    while pairs and pairs[0] == (0, 0):  # torch pads only the trailing dims it needs to
        pairs.pop(0)
    flat = _flat_pads(pairs)
    if not flat:
        return (lambda x: x), [op.x]
    if mode == "constant":
        return (lambda x: F.pad(x, flat, "constant", value)), [op.x]
    m = _PAD_MODES[mode]
    return (lambda x: F.pad(x, flat, m)), [op.x]


def _to_static_shape(op: Any, c: Ctx, param: str | None) -> tuple[Callable[..., Any], list[Any]]:
    shape = c.static_shape(op.outputs[0])
    if shape is None and param is not None:
        shape = tuple(c.ints(param))
    if shape is None:
        raise UnsupportedError(f"{op.op_type} {op.name!r}: output shape is not static")
    return (lambda x: torch.reshape(x, shape)), [op.x]


@_op("reshape")
def _reshape(op, c):
    return _to_static_shape(op, c, "shape")


@_op("squeeze", "expand_dims", "flatten2d", "reshape_like")
def _reshape_static(op, c):
    return _to_static_shape(op, c, None)


@_op("transpose")
def _transpose(op, c):
    perm = c.ints("perm")
    return (lambda x: x.permute(perm)), [op.x]


@_op("concat")
def _concat(op, c):
    if c.param("interleave", False):
        raise UnsupportedError(f"concat {op.name!r}: interleave=True is not supported")
    axis = int(c.param("axis"))
    return (lambda *xs: torch.cat(xs, dim=axis)), list(op.values)


@_op("stack")
def _stack(op, c):
    axis = int(c.param("axis"))
    return (lambda *xs: torch.stack(xs, dim=axis)), list(op.values)


@_op("split")
def _split(op, c):
    axis = int(c.param("axis"))
    sizes = c.ints("split_sizes")
    if sizes is None:
        n = int(c.param("num_splits"))
        shape = c.static_shape(op.x)
        if shape is None:
            raise UnsupportedError(f"split {op.name!r}: num_splits on a flexible shape")
        sizes = [shape[axis] // n] * n
    return (lambda x: torch.split(x, sizes, dim=axis)), [op.x]


@_op("tile")
def _tile(op, c):
    reps = c.ints("reps")
    return (lambda x: x.repeat(reps)), [op.x]


@_op("slice_by_index")
def _slice_by_index(op, c):
    rank = op.x.rank
    begin = c.ints("begin")
    end = c.ints("end")
    stride = c.ints("stride", [1] * rank)
    bmask = [bool(v) for v in np.asarray(c.param("begin_mask", [False] * rank)).reshape(-1)]
    emask = [bool(v) for v in np.asarray(c.param("end_mask", [False] * rank)).reshape(-1)]
    smask = [bool(v) for v in np.asarray(c.param("squeeze_mask", [False] * rank)).reshape(-1)]
    index: list[Any] = []
    for i in range(rank):
        if stride[i] <= 0:
            raise UnsupportedError(f"slice_by_index {op.name!r}: non-positive strides are not supported")
        if smask[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    index_t = tuple(index)
    return (lambda x: x[index_t]), [op.x]


@_op("slice_by_size")
def _slice_by_size(op, c):
    begin, size = c.ints("begin"), c.ints("size")
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))
    return (lambda x: x[index]), [op.x]


@_op("upsample_nearest_neighbor")
def _upsample_nn(op, c):
    sh = float(c.param("scale_factor_height", 1))
    sw = float(c.param("scale_factor_width", 1))
    if not (sh.is_integer() and sw.is_integer()):  # fractional factors: Core ML's index rounding is unpinned
        raise UnsupportedError(f"upsample_nearest_neighbor {op.name!r}: fractional scale factors "
                               f"({sh}, {sw}) are not supported")
    factors = (int(sh), int(sw))
    return (lambda x: F.interpolate(x, scale_factor=factors, mode="nearest")), [op.x]


@_op("upsample_bilinear")
def _upsample_bilinear(op, c):
    sh = float(c.param("scale_factor_height", 1))
    sw = float(c.param("scale_factor_width", 1))
    align = bool(c.param("align_corners", True))
    half_pixel = bool(c.param("half_pixel_centers", not align))
    shape = c.static_shape(op.outputs[0])
    if shape is None:
        raise UnsupportedError(f"upsample_bilinear {op.name!r}: output shape is not static")
    size = shape[-2:]
    if align and not half_pixel:
        return (lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)), [op.x]
    if half_pixel and not align and sh.is_integer() and sw.is_integer():
        return (lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)), [op.x]
    raise UnsupportedError(f"upsample_bilinear {op.name!r}: align_corners={align}, half_pixel_centers="
                           f"{half_pixel} with factors ({sh}, {sw}) is not supported")


@_op("pixel_shuffle")
def _pixel_shuffle(op, c):
    r = int(c.param("upscale_factor"))
    return (lambda x: F.pixel_shuffle(x, r)), [op.x]


@_op("pixel_unshuffle")
def _pixel_unshuffle(op, c):
    r = int(c.param("downscale_factor"))
    return (lambda x: F.pixel_unshuffle(x, r)), [op.x]
