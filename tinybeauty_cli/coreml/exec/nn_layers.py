"""The NeuralNetwork layers the reference executor evaluates, and the decoding of their weights
(``WeightParams``: fp32, fp16, linear and look-up-table quantization). :data:`LAYERS` maps layer
kinds to builders that turn one layer into a PyTorch call with its parameters bound.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import UnsupportedError

LayerBuilder = Callable[[Any, Any], tuple[Callable[..., Any], list[str]]]
LAYERS: dict[str, LayerBuilder] = {}


def _layer(*names: str) -> Callable[[LayerBuilder], LayerBuilder]:
    def register(fn: LayerBuilder) -> LayerBuilder:
        for n in names:
            LAYERS[n] = fn
        return fn
    return register


def _refuse(layer: Any, what: str) -> UnsupportedError:
    return UnsupportedError(f"{layer.WhichOneof('layer')} layer {layer.name!r}: {what} is not supported by the "
                            "Core ML reference executor")


# ---------------------------------------------------------------- weights

def unpack_bits(raw: bytes, count: int, nbits: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit integers packed most-significant bit first (coremltools' layout)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if nbits == 8:
        return data[:count].astype(np.int64)
    bits = np.unpackbits(data, bitorder="big")[: count * nbits]
    if bits.size < count * nbits:
        raise UnsupportedError(f"quantized weights hold {data.size} bytes, too few for {count} {nbits}-bit values")
    return bits.reshape(count, nbits).astype(np.int64) @ (1 << np.arange(nbits - 1, -1, -1))


def weight_array(wp: Any, shape: Sequence[int], axis: int = 0, what: str = "weights") -> np.ndarray:
    """Decode a ``WeightParams`` into a float32 array of ``shape`` (``axis``: per-channel quantization axis)."""
    count = int(np.prod(shape)) if len(shape) else 1
    q = wp.quantization if wp.HasField("quantization") else None
    if len(wp.floatValue):
        arr = np.asarray(wp.floatValue, dtype=np.float32)
    elif len(wp.float16Value):
        arr = np.frombuffer(wp.float16Value, dtype="<f2").astype(np.float32)
    elif len(wp.rawValue) and q is not None and q.numberOfBits:
        nbits = int(q.numberOfBits)
        if not 1 <= nbits <= 8:
            raise UnsupportedError(f"{what}: {nbits}-bit quantized weights are not supported")
        idx = unpack_bits(wp.rawValue, count, nbits)
        kind = q.WhichOneof("QuantizationType")
        if kind == "linearQuantization":
            scale = np.asarray(q.linearQuantization.scale, dtype=np.float64)
            bias = np.asarray(q.linearQuantization.bias, dtype=np.float64)
            if scale.size == 1 and bias.size <= 1:
                arr = idx * scale[0] + (bias[0] if bias.size else 0.0)
            else:
                channels = shape[axis]
                if scale.size != channels or bias.size not in (0, channels):
                    raise UnsupportedError(f"{what}: {scale.size} quantization scales for {channels} channels")
                view = [1] * len(shape)
                view[axis] = channels
                q_idx = idx.reshape(shape)
                arr = q_idx * scale.reshape(view) + (bias.reshape(view) if bias.size else 0.0)
            arr = np.asarray(arr, dtype=np.float32).reshape(-1)
        elif kind == "lookupTableQuantization":
            lut = np.asarray(q.lookupTableQuantization.floatValue, dtype=np.float32)
            if lut.size < (1 << nbits) and idx.max(initial=0) >= lut.size:
                raise UnsupportedError(f"{what}: look-up table of {lut.size} entries for {nbits}-bit indices")
            arr = lut[idx]
        else:
            raise UnsupportedError(f"{what}: quantization type {kind!r} is not supported")
    elif len(wp.rawValue) == 4 * count:  # unquantized raw bytes: little-endian fp32
        arr = np.frombuffer(wp.rawValue, dtype="<f4").astype(np.float32)
    elif len(wp.int8RawValue):
        raise UnsupportedError(f"{what}: int8RawValue weights (int8 matrix multiply) are not supported")
    elif count == 0:
        arr = np.zeros(0, np.float32)
    else:
        raise UnsupportedError(f"{what}: no weight values found")
    if arr.size != count:
        raise UnsupportedError(f"{what}: {arr.size} values for shape {tuple(shape)}")
    return arr.reshape(shape)


def weight_tensor(wp: Any, shape: Sequence[int], axis: int = 0, what: str = "weights") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(weight_array(wp, shape, axis, what)))


def _vector(wp: Any, what: str) -> torch.Tensor | None:
    """A 1-D parameter whose length is whatever the file holds (or None when empty)."""
    n = len(wp.floatValue) or len(wp.float16Value) // 2
    if not n and len(wp.rawValue):
        if wp.HasField("quantization") and wp.quantization.numberOfBits:
            raise UnsupportedError(f"{what}: quantized vectors without a known length are not supported")
        n = len(wp.rawValue) // 4
    return weight_tensor(wp, (n,), what=what) if n else None


# ---------------------------------------------------------------- convolution and pooling

def _border(amounts: Any) -> list[tuple[int, int]]:
    return [(int(b.startEdgeSize), int(b.endEdgeSize)) for b in amounts.borderAmounts]


def _same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               top_left_heavy: bool) -> list[tuple[int, int]]:
    pads = []
    for n, k, s in zip(sizes, kernel, strides):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        small = total // 2
        pads.append((total - small, small) if top_left_heavy else (small, total - small))
    return pads


@_layer("convolution")
def _convolution(layer, p):
    if len(layer.input) != 1:
        raise _refuse(layer, "weights given as a second input")
    kh, kw = (list(p.kernelSize) or [3, 3])
    strides = list(p.stride) or [1, 1]
    dil = list(p.dilationFactor) or [1, 1]
    groups = int(p.nGroups) or 1
    out_ch, k_ch = int(p.outputChannels), int(p.kernelChannels)
    b = weight_tensor(p.bias, (out_ch,), what=f"{layer.name} bias") if p.hasBias else None
    pad_kind = p.WhichOneof("ConvolutionPaddingType")
    if not p.isDeconvolution:
        w = weight_tensor(p.weights, (out_ch, k_ch, kh, kw), what=f"{layer.name} weights")
        eff = [(kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1]
        if pad_kind == "same":
            heavy = p.same.asymmetryMode == 1  # TOP_LEFT_HEAVY

            def conv_same(x: torch.Tensor) -> torch.Tensor:
                pads = _same_pads(x.shape[-2:], eff, strides, heavy)
                return F.conv2d(F.pad(x, [v for q in reversed(pads) for v in q]), w, b, strides, 0, dil, groups)
            return conv_same, [layer.input[0]]
        pads = _border(p.valid.paddingAmounts) or [(0, 0), (0, 0)]
        if all(a == e for a, e in pads):
            padding = tuple(a for a, _ in pads)
            return (lambda x: F.conv2d(x, w, b, strides, padding, dil, groups)), [layer.input[0]]
        flat = [v for q in reversed(pads) for v in q]
        return (lambda x: F.conv2d(F.pad(x, flat), w, b, strides, 0, dil, groups)), [layer.input[0]]
    # deconvolution: weights [C_in, C_out / groups, kH, kW], linear quantization along axis 1
    w = weight_tensor(p.weights, (k_ch, out_ch // groups, kh, kw), axis=1, what=f"{layer.name} weights")
    out_shape = [int(v) for v in p.outputShape]
    pads = (_border(p.valid.paddingAmounts) if pad_kind == "valid" else []) or [(0, 0), (0, 0)]

    def deconv(x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, w, b, strides, 0, 0, groups, dil)
        if pad_kind == "same":  # output = input * stride; where an odd excess would go is not pinned down
            want = out_shape or [x.shape[-2] * strides[0], x.shape[-1] * strides[1]]
            if list(y.shape[-2:]) != want:
                raise _refuse(layer, "'same' padding that crops the output")
            return y
        y = y[..., pads[0][0]: y.shape[-2] - pads[0][1], pads[1][0]: y.shape[-1] - pads[1][1]]
        if out_shape and list(y.shape[-2:]) != out_shape:
            raise _refuse(layer, f"an outputShape {out_shape} that differs from the padded result "
                                 f"{list(y.shape[-2:])}")
        return y
    return deconv, [layer.input[0]]


@_layer("pooling")
def _pooling(layer, p):
    kind = p.type  # MAX = 0, AVERAGE = 1, L2 = 2
    if kind not in (0, 1):
        raise _refuse(layer, "L2 pooling")
    if p.globalPooling:
        if kind == 0:
            return (lambda x: torch.amax(x, dim=(-2, -1), keepdim=True)), [layer.input[0]]
        return (lambda x: torch.mean(x, dim=(-2, -1), keepdim=True)), [layer.input[0]]
    kernel = [int(k) for k in p.kernelSize]
    strides = [int(s) for s in p.stride] or kernel
    pad_kind = p.WhichOneof("PoolingPaddingType")
    if pad_kind != "valid":
        raise _refuse(layer, f"{pad_kind} pooling padding")
    pads = _border(p.valid.paddingAmounts) or [(0, 0), (0, 0)]
    if not all(a == e and a <= k // 2 for (a, e), k in zip(pads, kernel)):
        raise _refuse(layer, f"pooling padding {pads}")
    padding = tuple(a for a, _ in pads)
    if kind == 0:
        return (lambda x: F.max_pool2d(x, kernel, strides, padding)), [layer.input[0]]
    include = not p.avgPoolExcludePadding
    return (lambda x: F.avg_pool2d(x, kernel, strides, padding, count_include_pad=include)), [layer.input[0]]


@_layer("padding")
def _padding(layer, p):
    pads = _border(p.paddingAmounts) or [(0, 0), (0, 0)]
    flat = [v for q in reversed(pads) for v in q]
    kind = p.WhichOneof("PaddingType")
    if kind == "constant":
        value = float(p.constant.value)
        return (lambda x: F.pad(x, flat, "constant", value)), [layer.input[0]]
    mode = {"reflection": "reflect", "replication": "replicate"}.get(kind)
    if mode is None:
        raise _refuse(layer, f"padding type {kind!r}")
    return (lambda x: F.pad(x, flat, mode)), [layer.input[0]]


@_layer("upsample")
def _upsample(layer, p):
    if len(p.fractionalScalingFactor):
        raise _refuse(layer, "fractional scaling factors")
    factors = tuple(int(s) for s in p.scalingFactor) or (1, 1)
    if p.mode == 0:  # NN
        return (lambda x: F.interpolate(x, scale_factor=factors, mode="nearest")), [layer.input[0]]
    if p.linearUpsampleMode in (1, 2):  # ALIGN_CORNERS_TRUE / FALSE
        align = p.linearUpsampleMode == 1

        def bilinear(x: torch.Tensor) -> torch.Tensor:
            size = (x.shape[-2] * factors[0], x.shape[-1] * factors[1])
            return F.interpolate(x, size=size, mode="bilinear", align_corners=align)
        return bilinear, [layer.input[0]]
    raise _refuse(layer, "bilinear upsampling in DEFAULT mode")


@_layer("reorganizeData")
def _reorganize(layer, p):
    r = int(p.blockSize)
    if p.mode == 2:  # PIXEL_SHUFFLE
        return (lambda x: F.pixel_shuffle(x, r)), [layer.input[0]]
    raise _refuse(layer, "SPACE_TO_DEPTH / DEPTH_TO_SPACE")


# ---------------------------------------------------------------- normalization

@_layer("batchnorm")
def _batchnorm(layer, p):
    c = int(p.channels)
    g = weight_tensor(p.gamma, (c,), what=f"{layer.name} gamma")
    b = weight_tensor(p.beta, (c,), what=f"{layer.name} beta")
    eps = float(p.epsilon)
    if p.instanceNormalization:
        if not p.computeMeanVar:
            raise _refuse(layer, "instance normalization without computeMeanVar")
        return (lambda x: F.instance_norm(x, weight=g, bias=b, eps=eps)), [layer.input[0]]
    if p.computeMeanVar:
        raise _refuse(layer, "batch statistics computed at run time")
    mean = weight_tensor(p.mean, (c,), what=f"{layer.name} mean")
    var = weight_tensor(p.variance, (c,), what=f"{layer.name} variance")
    return (lambda x: F.batch_norm(x, mean, var, g, b, False, 0.0, eps)), [layer.input[0]]


# ---------------------------------------------------------------- activations and unary

@_layer("activation")
def _activation(layer, p):
    kind = p.WhichOneof("NonlinearityType")
    a = getattr(p, kind)
    inp = [layer.input[0]]
    if kind == "ReLU":
        return torch.relu, inp
    if kind == "tanh":
        return torch.tanh, inp
    if kind == "sigmoid":
        return torch.sigmoid, inp
    if kind == "leakyReLU":
        alpha = float(a.alpha)
        return (lambda x: F.leaky_relu(x, alpha)), inp
    if kind == "linear":
        alpha, beta = float(a.alpha), float(a.beta)
        return (lambda x: alpha * x + beta), inp
    if kind == "scaledTanh":
        alpha, beta = float(a.alpha), float(a.beta)
        return (lambda x: alpha * torch.tanh(beta * x)), inp
    if kind == "sigmoidHard":
        alpha, beta = float(a.alpha), float(a.beta)
        return (lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)), inp
    if kind == "ELU":
        alpha = float(a.alpha)
        return (lambda x: F.elu(x, alpha)), inp
    if kind == "thresholdedReLU":
        alpha = float(a.alpha)
        return (lambda x: torch.where(x >= alpha, x, torch.zeros_like(x))), inp
    if kind == "softsign":
        return F.softsign, inp
    if kind == "softplus":
        return F.softplus, inp
    if kind == "PReLU":
        alpha = _vector(a.alpha, f"{layer.name} alpha")
        return (lambda x: F.prelu(x, alpha)), inp
    raise _refuse(layer, f"activation {kind!r}")


@_layer("unary")
def _unary(layer, p):
    if p.scale == 0.0:  # proto3 cannot tell "unset" from 0: refuse rather than guess
        raise _refuse(layer, "scale 0")
    scale, shift, eps, alpha = float(p.scale), float(p.shift), float(p.epsilon), float(p.alpha)
    kind = p.type  # SQRT RSQRT INVERSE POWER EXP LOG ABS THRESHOLD
    pre = (lambda x: x) if (scale, shift) == (1.0, 0.0) else (lambda x: scale * x + shift)
    fns: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
        0: lambda x: torch.sqrt(pre(x)),
        1: lambda x: torch.rsqrt(pre(x) + eps),
        2: lambda x: torch.reciprocal(pre(x) + eps),
        3: (lambda x: torch.square(pre(x))) if alpha == 2.0 else (lambda x: torch.pow(pre(x), alpha)),
        4: lambda x: torch.exp(pre(x)),
        5: lambda x: torch.log(pre(x) + eps),
        6: lambda x: torch.abs(pre(x)),
        7: lambda x: torch.clamp(pre(x), min=alpha),
    }
    if kind not in fns:
        raise _refuse(layer, f"unary type {kind}")
    return fns[kind], [layer.input[0]]


@_layer("clip")
def _clip(layer, p):
    lo, hi = float(p.minVal), float(p.maxVal)
    return (lambda x: torch.clamp(x, lo, hi)), [layer.input[0]]


@_layer("gelu")
def _gelu(layer, p):
    mode = p.mode  # EXACT TANH_APPROXIMATION SIGMOID_APPROXIMATION
    if mode == 0:
        return F.gelu, [layer.input[0]]
    if mode == 1:
        return (lambda x: F.gelu(x, approximate="tanh")), [layer.input[0]]
    return (lambda x: x * torch.sigmoid(1.702 * x)), [layer.input[0]]


for _name, _fn in {"tanh": torch.tanh, "erf": torch.erf, "exp2": torch.exp2, "floor": torch.floor,
                   "ceil": torch.ceil, "sign": torch.sign, "round": torch.round, "sin": torch.sin,
                   "cos": torch.cos}.items():
    LAYERS[_name] = (lambda f: (lambda layer, p: (f, [layer.input[0]])))(_fn)


@_layer("softmaxND")
def _softmax_nd(layer, p):
    axis = int(p.axis)
    return (lambda x: torch.softmax(x, dim=axis)), [layer.input[0]]


@_layer("softmax")
def _softmax(layer, p):
    return (lambda x: torch.softmax(x, dim=-3)), [layer.input[0]]


# ---------------------------------------------------------------- elementwise with several inputs

def _fold(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def folded(*xs: torch.Tensor) -> torch.Tensor:
        y = xs[0]
        for x in xs[1:]:
            y = fn(y, x)
        return y
    return folded


@_layer("add")
def _add(layer, p):
    if len(layer.input) == 1:
        alpha = float(p.alpha)
        return (lambda x: x + alpha), [layer.input[0]]
    return _fold(torch.add), list(layer.input)


@_layer("multiply")
def _multiply(layer, p):
    if len(layer.input) == 1:
        alpha = float(p.alpha)
        return (lambda x: x * alpha), [layer.input[0]]
    return _fold(torch.mul), list(layer.input)


@_layer("average")
def _average(layer, p):
    n = len(layer.input)
    return (lambda *xs: _fold(torch.add)(*xs) / n), list(layer.input)


@_layer("max")
def _max(layer, p):
    return _fold(torch.maximum), list(layer.input)


@_layer("min")
def _min(layer, p):
    return _fold(torch.minimum), list(layer.input)


for _name, _fn in {"addBroadcastable": torch.add, "subtractBroadcastable": torch.sub,
                   "multiplyBroadcastable": torch.mul, "divideBroadcastable": torch.true_divide,
                   "maxBroadcastable": torch.maximum, "minBroadcastable": torch.minimum,
                   "powBroadcastable": torch.pow}.items():
    LAYERS[_name] = (lambda f: (lambda layer, p: (f, list(layer.input))))(_fn)


def _compare(fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> LayerBuilder:
    def build(layer, p):
        if len(layer.input) == 1:  # compared with the scalar alpha
            alpha = float(p.alpha)
            return (lambda x: fn(x, alpha).to(torch.float32)), [layer.input[0]]
        return (lambda x, y: fn(x, y).to(torch.float32)), list(layer.input)
    return build


for _name, _fn in {"greaterThan": torch.gt, "greaterEqual": torch.ge, "lessThan": torch.lt,
                   "lessEqual": torch.le, "equal": torch.eq, "notEqual": torch.ne}.items():
    LAYERS[_name] = _compare(_fn)


@_layer("whereBroadcastable")
def _where(layer, p):
    return (lambda c, a, b: torch.where(c != 0, a, b)), list(layer.input)


# ---------------------------------------------------------------- reductions

def _reduce_nd(kind: str) -> LayerBuilder:
    def build(layer, p):
        keep = bool(p.keepDims)
        axes = None if p.reduceAll else [int(a) for a in p.axes]

        def dims(x: torch.Tensor) -> list[int]:
            return list(range(x.dim())) if axes is None else axes
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "Mean": lambda x: torch.mean(x, dim=dims(x), keepdim=keep),
            "Sum": lambda x: torch.sum(x, dim=dims(x), keepdim=keep),
            "Max": lambda x: torch.amax(x, dim=dims(x), keepdim=keep),
            "Min": lambda x: torch.amin(x, dim=dims(x), keepdim=keep),
            "SumSquare": lambda x: torch.sum(x * x, dim=dims(x), keepdim=keep),
            "L1": lambda x: torch.sum(torch.abs(x), dim=dims(x), keepdim=keep),
            "L2": lambda x: torch.sqrt(torch.sum(x * x, dim=dims(x), keepdim=keep)),
            "LogSumExp": lambda x: torch.logsumexp(x, dim=dims(x), keepdim=keep),
        }
        return fns[kind], [layer.input[0]]
    return build


for _kind in ("Mean", "Sum", "Max", "Min", "SumSquare", "L1", "L2", "LogSumExp"):
    LAYERS[f"reduce{_kind}"] = _reduce_nd(_kind)


# ---------------------------------------------------------------- layout

@_layer("concat")
def _concat(layer, p):
    axis = -5 if p.sequenceConcat else -3
    return (lambda *xs: torch.cat(xs, dim=axis)), list(layer.input)


@_layer("concatND")
def _concat_nd(layer, p):
    if p.interleave:
        raise _refuse(layer, "interleave")
    axis = int(p.axis)
    return (lambda *xs: torch.cat(xs, dim=axis)), list(layer.input)


@_layer("reshapeStatic")
def _reshape_static(layer, p):
    shape = tuple(int(v) for v in p.targetShape)
    return (lambda x: torch.reshape(x, shape)), [layer.input[0]]


@_layer("rankPreservingReshape")
def _rank_preserving_reshape(layer, p):
    target = [int(v) for v in p.targetShape]  # 0: the input's size on that axis; -1: inferred

    def reshape(x: torch.Tensor) -> torch.Tensor:
        if len(target) != x.dim():
            raise _refuse(layer, f"a target shape {target} for a rank-{x.dim()} input")
        return torch.reshape(x, [x.shape[i] if t == 0 else t for i, t in enumerate(target)])
    return reshape, [layer.input[0]]


@_layer("transpose")
def _transpose(layer, p):
    axes = [int(a) for a in p.axes]
    return (lambda x: x.permute(axes)), [layer.input[0]]


@_layer("squeeze")
def _squeeze(layer, p):
    if p.squeezeAll:
        return torch.squeeze, [layer.input[0]]
    axes = tuple(int(a) for a in p.axes)
    return (lambda x: torch.squeeze(x, dim=axes)), [layer.input[0]]


@_layer("expandDims")
def _expand_dims(layer, p):
    axes = [int(a) for a in p.axes]

    def expand(x: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x
    return expand, [layer.input[0]]


@_layer("slice")
def _slice(layer, p):
    axis = {0: -3, 1: -2, 2: -1}[p.axis]
    start, end, stride = int(p.startIndex), int(p.endIndex), int(p.stride) or 1

    def sl(x: torch.Tensor) -> torch.Tensor:
        index: list[Any] = [slice(None)] * x.dim()
        index[axis] = slice(start, end, stride)
        return x[tuple(index)]
    return sl, [layer.input[0]]


@_layer("sliceStatic")
def _slice_static(layer, p):
    begin, end = [int(v) for v in p.beginIds], [int(v) for v in p.endIds]
    strides = [int(v) for v in p.strides] or [1] * len(begin)
    bmask, emask = list(p.beginMasks) or [False] * len(begin), list(p.endMasks) or [False] * len(begin)
    squeeze = list(p.squeezeMasks)
    if any(squeeze) or any(s <= 0 for s in strides):
        raise _refuse(layer, "squeeze masks or non-positive strides")
    index = tuple(slice(None if bm else b, None if em else e, s)
                  for b, e, s, bm, em in zip(begin, end, strides, bmask, emask))
    return (lambda x: x[index]), [layer.input[0]]
