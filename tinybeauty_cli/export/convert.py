"""From a PyTorch module to a Core ML model in memory: trace, ``ct.convert``, weight compression
(ML Program: ``coremltools.optimize.coreml``; NeuralNetwork: ``quantize_weights``, one pass per
palette size for ``--bits-by-layer``), compact graph
and metadata. :func:`export_module` is the transform: module in, Core ML model out; it writes
no file (:meth:`ExportedModel.save` does, where the caller wants it).

Only convolution and linear weights are compressed; biases and norm scales stay at float
precision. Palettes are k-means look-up tables (:func:`.palettes.kmeans_lut`) per tensor, or per
group of output channels with optional per-channel scales (iOS 18, through coremltools'
``OpPalettizerConfig``); on the NeuralNetwork format through coremltools' own
``quantize_weights(..., "custom_lut")``, because its built-in k-means path crashes on numpy 2.
int4 weights are linear per block of input channels (``OpLinearQuantizerConfig``, iOS 18).
int8 activations (:mod:`.activations`) are calibrated on the float program, before the weights
are compressed, as coremltools' W8A8 recipe orders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.artifact import ArchSpec, HistoryStep, Preprocessing
from ..core.counts import input_channels
from ..core.errors import TbOptError, UnsupportedError, UsageError
from ..core.images import synthetic_unlabeled
from ..coreml.compact import compact_neural_network, compact_program, inline_small_weights
from ..coreml.spec import coremltools, mil_program, quiet
from .activations import ActivationReport, int8_activations
from .config import (
    _WEIGHT_OPS,
    IMAGE_IN,
    IMAGE_OUT,
    META_PREFIX,
    TENSOR_IN,
    TENSOR_OUT,
    TARGETS,
    ExportConfig,
    ExportError,
    ExportPlan,
    plan_export,
    tensor_dtype,
)
from .metadata import describe
from .mixed import BitAllocation, allocate_bits, pair_with_ops
from .palette_gptq import calibration_inputs
from .palettes import PALETTIZED, kmeans_lut
from .prepare import CoreMLIO, coreml_ready_module, tensor_zeros


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


#: Elementwise ops that may follow the network in an image-I/O graph: ``x + r``, the clip, ``+ 1``, ``* 127.5``.
_IMAGE_TAIL_OPS = frozenset({"add", "sub", "mul", "real_div", "clip", "maximum", "minimum"})


def in_image_tail(op: Any) -> bool:
    """True for a MIL op of the elementwise tail that turns the network's output into the image
    output: it is one of :data:`_IMAGE_TAIL_OPS` and everything it feeds is such an op or the output.

    In fp16 these ops cost ~20 dB of fidelity before 8-bit rounding (fp16's step is 0.125 above
    128 in 0..255, and ``x + r`` would add the fp16-rounded input); kept in fp32 they read the
    fp32 input the image scaling gives and the network's fp16 output cast to fp32.
    """
    if op.op_type not in _IMAGE_TAIL_OPS:
        return False
    return all(in_image_tail(child) for out in op.outputs for child in out.child_ops)


def _compute_precision(ct: Any, config: ExportConfig) -> Any:
    """fp32, or fp16 for every op but the image tail (:func:`in_image_tail`) of an image-I/O program."""
    if config.precision == "fp32":
        return ct.precision.FLOAT32
    if config.io != "image":
        return ct.precision.FLOAT16
    # coremltools' own fp16 pass, told which ops to cast (it casts the tail's fp16 operands back to fp32)
    return ct.transform.FP16ComputePrecision(op_selector=lambda op: not in_image_tail(op))


def _convert(traced: torch.jit.ScriptModule, config: ExportConfig, plan: ExportPlan, prep: Preprocessing,
             size: int, channels: int) -> Any:
    ct = coremltools()
    inputs, outputs = _io_types(ct, config, plan, prep, size, channels)
    kwargs: dict[str, Any] = dict(inputs=inputs, outputs=outputs,
                                  minimum_deployment_target=getattr(ct.target, plan.target),
                                  skip_model_load=True)
    if config.format == "mlprogram":
        kwargs.update(convert_to="mlprogram", compute_precision=_compute_precision(ct, config))
    else:
        kwargs.update(convert_to="neuralnetwork")
    try:
        with quiet():
            return ct.convert(traced, **kwargs)
    except ValueError as exc:
        needed = _target_needed(exc)
        if needed is None:
            raise ExportError(f"coremltools could not convert the model: ValueError: {_first_line(exc)}") from exc
        features = _features_needing(exc)
        if config.target is not None or (config.format == "neuralnetwork" and needed not in TARGETS[:2]):
            hint = (f"pass --target {needed}" if config.format == "mlprogram" or needed in TARGETS[:2]
                    else "write an .mlpackage (ML Program) instead")
            raise UsageError(f"the network's ops need {needed} or later in this format ({features})",
                             hint=hint) from None
        # No --target: the lowest target is also the lowest the network's own ops allow (e.g. GroupNorm
        # or a bilinear resize in a NeuralNetwork need iOS14), as coremltools' compatibility check says.
        plan.target = needed
        plan.notes.append(f"written for {needed}: the network's ops need it in this format ({features})")
        return _convert(traced, config, plan, prep, size, channels)
    except Exception as exc:  # noqa: BLE001 - coremltools raises anything; say what failed
        raise ExportError(f"coremltools could not convert the model: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _target_needed(exc: ValueError) -> str | None:
    """The iOS target coremltools' deployment check asks for ("... available from version 5 onwards"),
    or None when ``exc`` is another error."""
    import re  # noqa: PLC0415

    found = re.search(r"available from version (\d+) onwards", str(exc))
    if not found:
        return None
    name = coremltools().target(int(found.group(1))).name
    return next((t for t in TARGETS if t.lower() == name.lower()), None)


def _features_needing(exc: ValueError) -> str:
    """The features coremltools lists under its deployment error, on one line."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return "; ".join(line.split(". ", 1)[-1] for line in lines[:3]) or "features of a later version"


def _weight_dims(mlmodel: Any) -> dict[str, tuple[int, int]]:
    """(input channels, output channels) of the constant weight of every conv/linear op, by op name."""
    dims: dict[str, tuple[int, int]] = {}
    for op in mil_program(mlmodel).functions["main"].operations:
        weight = op.inputs.get("weight") if op.op_type in _WEIGHT_OPS else None
        if weight is None or weight.shape is None or len(weight.shape) < 2:
            continue
        shape = [int(d) for d in weight.shape]
        # coremltools' axes (optimize._utils.select_input_output_channel_axis): conv_transpose
        # weights are (C_in, C_out/groups, ...), the others (C_out, C_in/groups, ...)
        dims[op.name] = (shape[0], shape[1]) if op.op_type == "conv_transpose" else (shape[1], shape[0])
    return dims


def _weight_shapes(mlmodel: Any) -> dict[str, tuple[int, ...]]:
    """The constant weight shape of every conv/linear op, by op name, in graph order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for op in mil_program(mlmodel).functions["main"].operations:
        weight = op.inputs.get("weight") if op.op_type in _WEIGHT_OPS else None
        if weight is not None and weight.shape is not None and len(weight.shape) >= 2:
            shapes[op.name] = tuple(int(d) for d in weight.shape)
    return shapes


def _per_layer(config_for: Callable[[int], Any], wanted: int, sizes: dict[str, int]) -> dict[str, Any]:
    """Op-name configs for the layers whose channel count ``wanted`` does not divide: the largest
    common divisor there (coremltools would leave such a layer uncompressed, with a warning)."""
    return {name: config_for(math.gcd(n, wanted)) for name, n in sizes.items() if n % wanted}


def _compress_program(mlmodel: Any, config: ExportConfig, plan: ExportPlan,
                      layer_bits: dict[str, int] | None = None) -> Any:
    """Compress the program's conv/linear weights as ``config`` says; ``layer_bits`` (op name ->
    palette bits, ``--bits-by-layer``) overrides the palette size op by op."""
    ct = coremltools()
    opt = ct.optimize.coreml
    mode = config.weight_mode
    dims = _weight_dims(mlmodel) if mode == "int4" or config.grouped or layer_bits else {}
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
        elif mode == "int4":
            def int4(block: int) -> Any:
                return opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                   block_size=block, weight_threshold=0)

            block = config.int4_block_size
            by_name = _per_layer(int4, block, {name: c_in for name, (c_in, _) in dims.items()})
            mlmodel = opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(
                op_type_configs={t: int4(block) for t in _WEIGHT_OPS}, op_name_configs=by_name),
                joint_compression=joint)
        elif config.palette_bits is not None:
            def lut_function(bits: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
                def table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                    lut, indices = kmeans_lut(weights, bits)  # one table per tensor, or per group of channels
                    return lut.astype(weights.dtype), indices
                return table

            def palettes(group: int | None, bits: int = config.palette_bits) -> Any:
                grouping = ({"granularity": "per_grouped_channel", "group_size": group} if group
                            else {"granularity": "per_tensor"})
                # mode 'custom' takes no nbits: the table ``lut_function`` returns sets the size
                return opt.OpPalettizerConfig(mode="custom", lut_function=lut_function(bits), weight_threshold=0,
                                              enable_per_channel_scale=config.per_channel_scale, **grouping)

            group = config.palette_group_size if config.grouped else None
            by_name = _per_layer(palettes, group, {name: c_out for name, (_, c_out) in dims.items()}) if group else {}
            for name, bits in (layer_bits or {}).items():  # --bits-by-layer: one config per op
                c_out = dims[name][1]
                by_name[name] = palettes(math.gcd(c_out, group) if group else None, bits)
            mlmodel = opt.palettize_weights(mlmodel, opt.OptimizationConfig(
                op_type_configs={t: palettes(group) for t in _WEIGHT_OPS}, op_name_configs=by_name),
                joint_compression=joint)
    return mlmodel


#: NeuralNetwork layers whose weights are compressed.
_NN_WEIGHT_LAYERS = ("convolution", "innerProduct", "batchedMatmul")


class _ConvWeightsOnly:
    """NeuralNetwork quantization selector: conv / inner-product weights, not their biases;
    ``names``: only the layers of these names (one pass of ``--bits-by-layer``)."""

    def __init__(self, names: frozenset[str] | None = None) -> None:
        from coremltools.models.neural_network.quantization_utils import QuantizedLayerSelector  # noqa: PLC0415

        self._base = QuantizedLayerSelector()
        self._names = names

    def do_quantize(self, layer: Any, weight_param: str | None = None, **_: Any) -> bool:
        if layer.WhichOneof("layer") not in _NN_WEIGHT_LAYERS:
            return False
        if self._names is not None and layer.name not in self._names:
            return False
        return weight_param != "bias"


def _nn_weight_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """The float weight shape of every conv / inner-product layer of a NeuralNetwork spec, by layer
    name, in graph order (the shapes ``quantize_weights`` reads them with)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in spec.neuralNetwork.layers:
        kind = layer.WhichOneof("layer")
        if kind not in _NN_WEIGHT_LAYERS:
            continue
        p = getattr(layer, kind)
        if not len(p.weights.floatValue):
            continue
        if kind == "convolution":
            kh, kw = p.kernelSize
            groups = p.nGroups or 1
            shapes[layer.name] = ((p.kernelChannels, p.outputChannels // groups, kh, kw) if p.isDeconvolution
                                  else (p.outputChannels, p.kernelChannels, kh, kw))
        elif kind == "innerProduct":
            shapes[layer.name] = (p.outputChannels, p.inputChannels)
        else:
            shapes[layer.name] = (p.weightMatrixSecondDimension, p.weightMatrixFirstDimension)
    return shapes


def _nn_palette_sizes(spec: Any) -> dict[str, int]:
    """The palette bits of every palettized conv / inner-product weight, by layer name."""
    sizes: dict[str, int] = {}
    for layer in spec.neuralNetwork.layers:
        kind = layer.WhichOneof("layer")
        if kind in _NN_WEIGHT_LAYERS:
            q = getattr(layer, kind).weights.quantization
            if q.WhichOneof("QuantizationType") == "lookupTableQuantization":
                sizes[layer.name] = int(q.numberOfBits)
    return sizes


def _compress_neural_network(mlmodel: Any, config: ExportConfig, allocation: BitAllocation | None = None) -> Any:
    """Compress the conv/linear weights with coremltools' ``quantize_weights``; ``allocation``
    (``--bits-by-layer``): each layer's palette bits, one pass per size with a selector of that
    size's layers by name (``quantize_weights`` takes one size per call and leaves what its
    selector skips, and weights already quantized, as they are)."""
    ct = coremltools()
    from coremltools.models.neural_network import quantization_utils as qu  # noqa: PLC0415

    mode = config.weight_mode
    with quiet():
        if mode == "int8":
            mlmodel = qu.quantize_weights(mlmodel, 8, "linear", selector=_ConvWeightsOnly())
        elif config.palette_bits is not None:
            def lut_function(nbits: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return kmeans_lut(weights, nbits)

            if allocation is None:
                passes = [(config.palette_bits, None)]
            else:
                layer_bits = pair_with_ops(allocation, _nn_weight_shapes(mlmodel.get_spec()))
                passes = [(b, frozenset(n for n, nb in layer_bits.items() if nb == b))
                          for b in sorted(set(layer_bits.values()))]
            for bits, names in passes:
                if not isinstance(mlmodel, ct.models.MLModel):
                    mlmodel = ct.models.MLModel(mlmodel, skip_model_load=True)
                mlmodel = qu.quantize_weights(mlmodel, bits, "custom_lut", lut_function=lut_function,
                                              selector=_ConvWeightsOnly(names))
            if allocation is not None:
                spec = mlmodel if not isinstance(mlmodel, ct.models.MLModel) else mlmodel.get_spec()
                if _nn_palette_sizes(spec) != layer_bits:
                    raise ExportError("the NeuralNetwork's palettes are not the bits chosen by layer")
        if config.precision == "fp16":  # everything still in fp32 (biases, norms, or all weights)
            mlmodel = qu.quantize_weights(mlmodel, 16)
    if not isinstance(mlmodel, ct.models.MLModel):  # quantize_weights returns a spec off macOS 10.14+
        mlmodel = ct.models.MLModel(mlmodel, skip_model_load=True)
    return mlmodel


# --- the transform ---------------------------------------------------------------------------------------


@dataclass
class ExportedModel:
    """A Core ML model made from a module, not yet written, and what its file is checked against."""

    mlmodel: Any  # coremltools' MLModel: an ML Program's weights live in its temporary folder
    spec: Any  # the graph description as it will be written (compact, with tbopt's metadata)
    config: ExportConfig
    plan: ExportPlan
    size: int
    channels: int
    module: nn.Module  # what the graph computes, as PyTorch (the file's weights go into a copy of it)
    preprocessing: Preprocessing
    history: list[HistoryStep]  # the model's history, this export last
    activations: ActivationReport | None = None  # int8 activations: how they were calibrated
    bits_by_layer: BitAllocation | None = None  # --bits-by-layer: the palette bits of each layer


def plan_for(model: nn.Module, config: ExportConfig) -> ExportPlan:
    """The target and sparse storage an export of ``model`` gets (a clear error if the target is too low)."""
    return plan_export(config, tensor_zeros(model))


def export_module(model: nn.Module, config: ExportConfig, *, preprocessing: Preprocessing,
                  history: list[HistoryStep], arch: ArchSpec | None = None, source_sha256: str | None = None,
                  plan: ExportPlan | None = None, advance: Callable[..., None] | None = None,
                  calibration: np.ndarray | None = None, command: str | None = None,
                  allocation: BitAllocation | None = None) -> ExportedModel:
    """Convert a float model (eval mode) to a Core ML model as ``config`` asks; no file is written.

    ``preprocessing``, ``history``, ``arch`` and ``source_sha256`` describe the model in the
    file's metadata; ``plan`` is :func:`plan_for` when the caller checked it already;
    ``advance`` moves the caller's progress bar once per step (trace, convert, compress).
    ``calibration``: uint8 (N, H, W, 3) images at the export size for ``activations="int8"``
    (default: ``config.calib_count`` synthetic portraits, never the test set).
    ``command`` is the history's record of how the file is made (default: the configuration's
    :meth:`~.config.ExportConfig.command_line`). ``allocation``: the palette bits of each layer
    for ``bits_by_layer="auto"`` (:func:`bits_for_export`; default: chosen here on the calibration
    images).
    """
    advance = advance or (lambda n=1, **fields: None)
    size = config.size or preprocessing.size
    model = model.eval()
    channels = input_channels(model)
    plan = plan or plan_for(model, config)
    module = coreml_ready_module(model, size, config.format, channels)
    wrapped = CoreMLIO(module, config.io, preprocessing).eval()
    example = torch.zeros(1, channels, size, size)
    if config.bits_by_layer and allocation is None:
        if calibration is None:
            calibration = synthetic_unlabeled(config.calib_count, size).inputs
        allocation = bits_for_export(module, config, plan, calibration, preprocessing)
    try:
        with torch.no_grad(), quiet():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the model cannot be traced at {size}x{size}: {type(exc).__name__}: {exc}") from exc
    advance(1)
    with inline_small_weights():
        mlmodel = _convert(traced, config, plan, preprocessing, size, channels)
        advance(1)
        activations = None
        if config.activations == "int8":  # calibrated on the float program, before weight compression
            if calibration is None:
                calibration = synthetic_unlabeled(config.calib_count, size).inputs
            mlmodel, activations = int8_activations(mlmodel, calibration, config.io, preprocessing.value_range)
        try:
            if config.format == "mlprogram":
                layer_bits = pair_with_ops(allocation, _weight_shapes(mlmodel)) if allocation is not None else None
                mlmodel = _compress_program(mlmodel, config, plan, layer_bits)
            else:
                mlmodel = _compress_neural_network(mlmodel, config, allocation)
        except TbOptError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"coremltools could not compress the weights ({config.weight_mode}): "
                              f"{type(exc).__name__}: {exc}") from exc
    advance(1)
    spec = mlmodel.get_spec()
    if config.format == "mlprogram":
        compact_program(spec)
    else:
        compact_neural_network(spec)
        if allocation is not None:  # the layers' names in the file, once shortened
            allocation.ops = list(_nn_palette_sizes(spec))
        if config.io == "tensor":  # the converter leaves the output shape open; it is fixed
            out_type = spec.description.output[0].type.multiArrayType
            del out_type.shape[:]
            out_type.shape.extend([1, channels, size, size])  # a residual: the input's shape
    step = HistoryStep.now("export", command or config.command_line(), config.to_dict(),
                           {"target": plan.target, "sparse": plan.sparse})
    history = [*history, step]
    describe(spec, config, plan, size, preprocessing, history, arch=arch, source_sha256=source_sha256,
             bits_by_layer=allocation.record() if allocation is not None else None)
    return ExportedModel(mlmodel, spec, config, plan, size, channels, module, preprocessing, history, activations,
                         allocation)


#: Bytes kept from the budget of ``--bits-by-layer`` for what the choice adds to the file besides
#: its record: the option in the recorded configuration and command line, the longer description.
_RECORD_SLACK = 96


def bits_for_export(model: nn.Module, config: ExportConfig, plan: ExportPlan, calibration: np.ndarray,
                    preprocessing: Preprocessing, progress: Any = None) -> BitAllocation:
    """The palette bits of each layer of ``model`` for ``config.bits_by_layer="auto"``: within the
    bytes of ``config.palette_bits`` everywhere, less what the file's record of the choice costs
    (the file is then no larger than uniform palettes with the same other options).
    ``calibration``: uint8 (N, H, W, 3) images at the export size."""
    model = model.eval()
    n_layers = sum(1 for m in model.modules() if isinstance(m, PALETTIZED))
    reserve = len(META_PREFIX + "bits_by_layer") + 2 * n_layers + 1 + _RECORD_SLACK
    nn_format = config.format == "neuralnetwork"
    if nn_format:  # the weights', the convolution's and the layer's messages hold their lengths as varints
        reserve += 3 * n_layers  # that may take a byte more each
    return allocate_bits(model, config.palette_bits, calibration_inputs(calibration, preprocessing.value_range),
                         target=None if nn_format else plan.target,  # NeuralNetwork palettes: 1-8 bits on iOS 13
                         group_size=config.palette_group_size if config.grouped else None,
                         lut_itemsize=2 if config.precision == "fp16" and not nn_format else 4, reserve=reserve,
                         neural_network=nn_format, progress=progress)
