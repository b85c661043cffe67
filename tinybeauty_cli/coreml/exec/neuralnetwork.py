"""Reference executor for NeuralNetwork models (``.mlmodel``): the protobuf layers, with PyTorch.

Each layer of ``spec.neuralNetwork`` is compiled once into a PyTorch call following
the layer definitions of ``NeuralNetwork.proto``. Weights are decoded from their
``WeightParams``: fp32 (``floatValue``), fp16 (``float16Value``), and n-bit quantized
``rawValue`` (1-8 bits packed most-significant bit first) with either linear
(per-tensor or per-channel ``scale``/``bias``) or look-up-table quantization, the
layouts coremltools' ``quantization_utils`` writes. A layer type, or a variant of a
layer, that this module does not reproduce exactly is refused with its name.

Tensors keep their real rank (the ``EXACT_ARRAY_MAPPING`` / ``RANK4_IMAGE_MAPPING``
coremltools has written since iOS 13), so a rank-4 blob is ``[batch, C, H, W]`` and the
"channel" axis of the older layers is -3.

With ``fp16_emulation=True`` every layer output (and the input) is rounded to fp16,
as the GPU and Neural Engine run NeuralNetwork models.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.errors import UnsupportedError
from .graph import GraphBuilder, OpGraph, as_tensor, round_fp16
from .nn_layers import LAYERS, weight_array

# ---------------------------------------------------------------- the compiler

#: Layers whose meaning depends on the true rank of a tensor (refused under the old rank-5 mapping).
_RANK_DEPENDENT = {"reshapeStatic", "rankPreservingReshape", "transpose", "squeeze", "expandDims", "sliceStatic", "concatND",
                   "softmaxND", "loadConstantND", "reduceMean", "reduceSum", "reduceMax", "reduceMin",
                   "reduceSumSquare", "reduceL1", "reduceL2", "reduceLogSumExp"}


def network_of(spec: Any) -> Any:
    kind = spec.WhichOneof("Type")
    if kind not in ("neuralNetwork", "neuralNetworkRegressor", "neuralNetworkClassifier"):
        raise UnsupportedError(f"not a NeuralNetwork model (it holds a {kind} model)")
    if kind == "neuralNetworkClassifier":
        raise UnsupportedError("NeuralNetwork classifiers are not supported by the reference executor")
    return getattr(spec, kind)


def compile_network(spec: Any, fp16_emulation: bool = False) -> OpGraph:
    """Compile ``spec``'s NeuralNetwork into an :class:`OpGraph` over its input and output names."""
    nn = network_of(spec)
    kinds = [layer.WhichOneof("layer") for layer in nn.layers]
    unknown = sorted({k for k in kinds if k not in LAYERS and k != "loadConstantND"})
    if unknown:
        raise UnsupportedError(f"the Core ML reference executor does not implement NeuralNetwork layer(s) "
                               f"{', '.join(unknown)}", hint="run this model with Core ML on macOS")
    legacy = nn.arrayInputShapeMapping == 0 and any(i.type.WhichOneof("Type") == "multiArrayType"
                                                    for i in spec.description.input)
    legacy = legacy or (nn.imageInputShapeMapping == 0 and any(i.type.WhichOneof("Type") == "imageType"
                                                               for i in spec.description.input))
    if legacy and set(kinds) & _RANK_DEPENDENT:
        raise UnsupportedError("a NeuralNetwork with the old rank-5 input mapping and rank-dependent layers "
                               f"({', '.join(sorted(set(kinds) & _RANK_DEPENDENT))}) is not supported")
    g = GraphBuilder()
    inputs = [i.name for i in spec.description.input]
    for name in inputs:
        g.slot(name)
    for layer, kind in zip(nn.layers, kinds):
        params = getattr(layer, kind)
        if kind == "loadConstantND":
            g.consts[layer.output[0]] = weight_array(params.data, [int(s) for s in params.shape],
                                                     what=f"{layer.name} data")
            continue
        try:
            fn, ins = LAYERS[kind](layer, params)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise UnsupportedError(f"{kind} layer {layer.name!r}: cannot compile its parameters ({exc})") from exc
        if all(i in g.consts and i not in g.slots for i in ins):  # constant subgraph: fold it now
            with torch.inference_mode():
                value = fn(*[as_tensor(g.consts[i]) for i in ins])
            for name, v in zip(layer.output, value if len(layer.output) > 1 else (value,)):
                g.consts[name] = v
            continue
        rounded = list(range(len(layer.output))) if fp16_emulation else []
        g.add_step(layer.name, kind, fn, ins, list(layer.output), rounded)
    return g.finish(inputs, [o.name for o in spec.description.output])


class NeuralNetworkExecutor:
    """Evaluate a NeuralNetwork spec with PyTorch: ``run({input: tensor}) -> {output: tensor}``.

    ``run`` takes the network's inputs after image preprocessing (scale and bias are
    the caller's business, see :func:`image_scaler`).
    """

    def __init__(self, spec: Any, fp16_emulation: bool = False):
        self.spec = spec
        self.fp16_emulation = fp16_emulation
        self.graph = compile_network(spec, fp16_emulation)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.fp16_emulation:
            feeds = {n: round_fp16(t) for n, t in feeds.items()}
        return self.graph.run(feeds)

    def op_counts(self) -> dict[str, int]:
        return self.graph.op_counts()

    def weight_summary(self) -> dict[str, Any]:
        return summarize_weights(self.spec)


def image_scaler(spec: Any, input_name: str) -> tuple[float, tuple[float, float, float]] | None:
    """``(channelScale, (red, green, blue) bias)`` of an image input, None if it has no scaler."""
    nn = network_of(spec)
    for pre in nn.preprocessing:
        if pre.featureName in (input_name, ""):
            kind = pre.WhichOneof("preprocessor")
            if kind == "meanImage":
                raise UnsupportedError("mean-image preprocessing is not supported by the reference executor")
            if kind == "scaler":
                s = pre.scaler
                if s.channelScale == 0.0:  # proto3 cannot tell "unset" from 0: refuse rather than guess
                    raise UnsupportedError("an image scaler with channelScale 0 is not supported")
                return float(s.channelScale), (float(s.redBias), float(s.greenBias), float(s.blueBias))
    return None


def _weight_kind(wp: Any) -> str | None:
    if len(wp.floatValue):
        return "fp32"
    if len(wp.float16Value):
        return "fp16"
    if len(wp.rawValue) and wp.HasField("quantization") and wp.quantization.numberOfBits:
        q = wp.quantization
        kind = "linear" if q.WhichOneof("QuantizationType") == "linearQuantization" else "lut"
        return f"{q.numberOfBits}-bit {kind}"
    if len(wp.rawValue):
        return "fp32"
    return None


def summarize_weights(spec: Any) -> dict[str, Any]:
    """How a NeuralNetwork stores its weight tensors: counts by storage kind."""
    counts: dict[str, int] = {}
    for layer in network_of(spec).layers:
        params = getattr(layer, layer.WhichOneof("layer"))
        for field, value in params.ListFields():
            wps = [value] if field.message_type is not None and field.message_type.name == "WeightParams" else []
            for wp in wps:
                kind = _weight_kind(wp)
                if kind:
                    counts[kind] = counts.get(kind, 0) + 1
    return {"weight_storage": counts}
