"""From a PyTorch module to a Core ML model in memory: trace, ``ct.convert``, weight compression
(ML Program: ``coremltools.optimize.coreml``; NeuralNetwork: ``quantize_weights``), compact graph
and metadata. :func:`export_module` is the transform: module in, Core ML model out; it writes
no file (:meth:`ExportedModel.save` does, where the caller wants it).

Only convolution and linear weights are compressed; biases and norm scales stay at float
precision. Palettes are k-means look-up tables per tensor (:func:`.palettes.kmeans_lut`; on the
NeuralNetwork format through coremltools' own ``quantize_weights(..., "custom_lut")``, because
its built-in k-means path crashes on numpy 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.artifact import ArchSpec, HistoryStep, Preprocessing
from ..core.counts import input_channels
from ..core.errors import TbOptError, UnsupportedError
from ..coreml.compact import compact_neural_network, compact_program, inline_small_weights
from ..coreml.spec import coremltools, quiet
from .config import (
    _WEIGHT_OPS,
    IMAGE_IN,
    IMAGE_OUT,
    TENSOR_IN,
    TENSOR_OUT,
    ExportConfig,
    ExportError,
    ExportPlan,
    plan_export,
    tensor_dtype,
)
from .metadata import describe
from .palettes import kmeans_lut
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

    def save(self, path: Path | str) -> None:
        """Write the ``.mlmodel`` / ``.mlpackage`` to ``path`` (callers make it atomic)."""
        ct = coremltools()
        with quiet():
            weights_dir = self.mlmodel.weights_dir if self.config.format == "mlprogram" else None
            ct.models.MLModel(self.spec, weights_dir=weights_dir, skip_model_load=True).save(str(path))


def plan_for(model: nn.Module, config: ExportConfig) -> ExportPlan:
    """The target and sparse storage an export of ``model`` gets (a clear error if the target is too low)."""
    return plan_export(config, tensor_zeros(model))


def export_module(model: nn.Module, config: ExportConfig, *, preprocessing: Preprocessing,
                  history: list[HistoryStep], arch: ArchSpec | None = None, source_sha256: str | None = None,
                  plan: ExportPlan | None = None, advance: Callable[..., None] | None = None,
                  command: str | None = None) -> ExportedModel:
    """Convert a float model (eval mode) to a Core ML model as ``config`` asks; no file is written.

    ``preprocessing``, ``history``, ``arch`` and ``source_sha256`` describe the model in the
    file's metadata; ``plan`` is :func:`plan_for` when the caller checked it already;
    ``advance`` moves the caller's progress bar once per step (trace, convert, compress);
    ``command`` is the history's record of how the file is made (default: the configuration's
    :meth:`~.config.ExportConfig.command_line`).
    """
    advance = advance or (lambda n=1, **fields: None)
    size = config.size or preprocessing.size
    model = model.eval()
    channels = input_channels(model)
    plan = plan or plan_for(model, config)
    module = coreml_ready_module(model, size, config.format, channels)
    wrapped = CoreMLIO(module, config.io, preprocessing).eval()
    example = torch.zeros(1, channels, size, size)
    try:
        with torch.no_grad(), quiet():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the model cannot be traced at {size}x{size}: {type(exc).__name__}: {exc}") from exc
    advance(1)
    with inline_small_weights():
        mlmodel = _convert(traced, config, plan, preprocessing, size, channels)
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
    spec = mlmodel.get_spec()
    if config.format == "mlprogram":
        compact_program(spec)
    else:
        compact_neural_network(spec)
        if config.io == "tensor":  # the converter leaves the output shape open; it is fixed
            out_type = spec.description.output[0].type.multiArrayType
            del out_type.shape[:]
            out_type.shape.extend([1, channels, size, size])  # a residual: the input's shape
    step = HistoryStep.now("export", command or config.command_line(), config.to_dict(),
                           {"target": plan.target, "sparse": plan.sparse})
    history = [*history, step]
    describe(spec, config, plan, size, preprocessing, history, arch=arch, source_sha256=source_sha256)
    return ExportedModel(mlmodel, spec, config, plan, size, channels, module, preprocessing, history)
