"""int8 activations (W8A8, iOS 17+) for an ML Program: the range of every activation measured with
tbopt's reference executor on calibration images, then quantize/dequantize pairs written by
coremltools' own graph passes -- what ``coremltools.optimize.coreml.linear_quantize_activations``
does, on any OS.

That function measures the ranges by running Core ML itself (``MLModel.predict``, macOS only)
on a copy of the model whose intermediate tensors are all outputs. Everything else is its code,
reused as it is: which tensors it records (``ModelDebugger``), one range shared by a concat's
inputs and output, and the three passes that write the pairs
(``insert_prefix_quantize_dequantize_pair`` before each conv and add,
``insert_suffix_quantize_dequantize_pair`` after conv[+activation] and add,
``dequantize_quantize_pair_elimination``). Only ``predict`` is replaced: the reference executor
(:mod:`..coreml.exec`) computes the same tensors with PyTorch. Each tensor's range is the
min and max over all calibration images; coremltools 9.0 keeps only the last image's
(``record_intermediate_output`` overwrites before it compares: apple/coremltools#2704, fixed
after 9.0), so here the running min/max is kept as the fix does.

The additions that put the model's input back into its output (the made-up image ``x + r`` of an
image-I/O file, which the clip and the 0..255 scaling follow) are conversion arithmetic, not the
network: they stay in float, so the output keeps the input's 8-bit pixels as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from ..coreml.exec.mlprogram import MLProgramExecutor
from ..coreml.spec import coremltools, mil_program, quiet
from .config import ExportError

#: Ops whose output derives from the network rather than from the input alone.
_NETWORK_OPS = ("conv", "conv_transpose", "linear", "matmul")


@dataclass
class ActivationReport:
    """What int8 activation quantization did."""

    images: int  # calibration images run
    ranges: int  # tensors whose range was measured
    pairs: int  # quantize/dequantize pairs in the program
    kept_float: list[str]  # additions left in float (input and output conversion)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "ranges": self.ranges, "quantize_dequantize_pairs": self.pairs,
                "kept_float": list(self.kept_float)}


def calibration_feeds(images: np.ndarray, io: str, value_range: tuple[float, float]) -> list[np.ndarray]:
    """One (1, 3, H, W) float32 feed per uint8 (N, H, W, 3) image, as the model takes it: 0..255
    pixels for an image input, the model's value range for a tensor input."""
    pixels = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)).astype(np.float32)
    if io == "tensor":
        lo, hi = value_range
        pixels = pixels * ((hi - lo) / 255.0) + lo
    return [pixels[i:i + 1] for i in range(len(pixels))]


def activation_ranges(mlmodel: Any, feeds: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """``{tensor: {"rmin", "rmax"}}`` over ``feeds`` (each the model's one input), as coremltools'
    ``_get_activation_calibration_stats`` records them, computed by the reference executor."""
    coremltools()
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger  # noqa: PLC0415
    from coremltools.optimize.coreml.experimental._post_training_quantization import (  # noqa: PLC0415
        _adjust_concat_surrounding_activation_stats,
    )

    spec = mlmodel.get_spec()
    input_name = spec.description.input[0].name
    outputs = {o.name for o in spec.description.output}
    debugger = ModelDebugger(mlmodel)
    operations = debugger.block_info.operations
    # what coremltools appends to the outputs of its calibration copy (model outputs and
    # tensors of a type Core ML cannot output aside)
    wanted = {name for name in debugger.get_intermediate_output_names(lambda op: op.spec.type != "const")
              if name not in outputs and ModelDebugger.get_output_feature_type(name, operations) is not None}
    stats: dict[str, dict[str, float]] = {}

    def record(name: str, lo: float, hi: float) -> None:
        if name in stats:  # a running min/max over the images
            lo, hi = min(lo, stats[name]["rmin"]), max(hi, stats[name]["rmax"])
        stats[name] = {"rmin": lo, "rmax": hi}

    def observe(name: str, value: torch.Tensor) -> None:
        if name in wanted:
            pair = torch.aminmax(value.detach().float())
            record(name, pair.min.item(), pair.max.item())

    executor = MLProgramExecutor(mil_program(mlmodel))
    for feed in feeds:
        record(input_name, float(feed.min()), float(feed.max()))
        executor.run({input_name: torch.from_numpy(feed)}, observe)
    for name in sorted(wanted - set(stats)):  # values the executor folded as constants: measured too
        value = next((v.val for op in executor.function.operations for v in op.outputs if v.name == name), None)
        if value is not None:
            record(name, float(np.min(value)), float(np.max(value)))
    _adjust_concat_surrounding_activation_stats(debugger._get_concat_op_info(), stats)
    return stats


def conversion_additions(program: Any) -> list[str]:
    """Names of the ``add`` ops with an operand computed from the model input without the network
    (no convolution upstream): the made-up image ``x + r``, the input's scale and bias."""
    fn = program.functions["main"]
    from_network: set[str] = set()
    found: list[str] = []
    for op in fn.operations:
        operands = [v for inp in op.inputs.values() for v in (inp if isinstance(inp, (list, tuple)) else (inp,))
                    if v is not None]
        if op.op_type in _NETWORK_OPS or any(v.name in from_network for v in operands):
            from_network.update(o.name for o in op.outputs)
        if op.op_type == "add":
            live = [v for v in (op.x, op.y) if v.val is None]
            if any(v.name not in from_network for v in live):
                found.append(op.name)
    return found


def insert_quantize_dequantize(mlmodel: Any, ranges: dict[str, dict[str, float]],
                               keep_float: Iterable[str] = ()) -> Any:
    """The model with int8 quantize/dequantize pairs (linear symmetric, per tensor), written by
    coremltools' passes from ``ranges`` as ``linear_quantize_activations`` writes them; the ops
    named in ``keep_float`` are left out."""
    ct = coremltools()
    from coremltools.converters.mil.frontend.milproto import load as milproto  # noqa: PLC0415
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption  # noqa: PLC0415
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY  # noqa: PLC0415
    from coremltools.models import utils as model_utils  # noqa: PLC0415

    opt = ct.optimize.coreml
    config = opt.OptimizationConfig(global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric"),
                                    op_name_configs={name: None for name in keep_float})
    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair",
                 "compression::insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config), PassOption("activation_stats", ranges)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    with quiet():
        return model_utils._apply_graph_pass(mlmodel, passes, spec_version=ct._SPECIFICATION_VERSION_IOS_17,
                                             pymil_load_func=milproto.load, skip_model_load=True)


def int8_activations(mlmodel: Any, images: np.ndarray, io: str,
                     value_range: tuple[float, float]) -> tuple[Any, ActivationReport]:
    """Calibrate ``mlmodel`` (a float ML Program) on ``images`` (uint8, N x H x W x 3, at the model's
    size) and give it int8 activations."""
    if len(images) == 0:
        raise ExportError("int8 activations need at least one calibration image")
    feeds = calibration_feeds(images, io, value_range)
    try:
        ranges = activation_ranges(mlmodel, feeds)
        keep = conversion_additions(mil_program(mlmodel))
        quantized = insert_quantize_dequantize(mlmodel, ranges, keep)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - coremltools' passes raise anything; say what failed
        raise ExportError(f"int8 activation quantization failed: {type(exc).__name__}: {exc}") from exc
    block = quantized.get_spec().mlProgram.functions["main"]
    ops = block.block_specializations[block.opset].operations
    pairs = sum(1 for op in ops if op.type == "quantize")
    return quantized, ActivationReport(len(feeds), len(ranges), pairs, keep)
