"""Activation quantization ops of an ML Program (iOS 17+): ``quantize`` and ``dequantize``, as
``coremltools.optimize.coreml.linear_quantize_activations`` writes them around convolutions and
additions (the W8A8 files of ``tbopt export --activations int8``).

Following the MIL definitions (``coremltools.converters.mil.mil.ops.defs.iOS17.quantization_ops``)::

    quantize:   q = clip(round(x / scale) + zero_point, dtype's range)     int8 or uint8
    dequantize: y = scale * (q - zero_point)                               fp16 or fp32

``round`` is round-half-to-even: what coremltools' own evaluation of ``quantize`` does
(``np.around`` in ``optimize._utils.quantize_by_scale_and_zp``), and what PyTorch's
``quantize_per_tensor`` does, from which coremltools' converter writes this op. The division
runs in fp32, where an fp16 input and scale are exact. :data:`QUANT_OPS` maps op types to builders.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.errors import UnsupportedError
from .mil_ops import Builder, Ctx

_RANGES = {"int8": (-128, 127, torch.int8), "uint8": (0, 255, torch.uint8)}


def _per_axis(t: torch.Tensor | None, op: Any, c: Ctx, var: Any) -> torch.Tensor | None:
    """A scalar, or a vector along ``axis`` shaped to broadcast against ``var``."""
    if t is None or t.dim() == 0 or t.numel() == 1:
        return None if t is None else t.reshape(())
    axis = c.param("axis")
    if axis is None:
        raise UnsupportedError(f"{op.op_type} {op.name!r}: a vector scale or zero point without an axis")
    rank = var.rank
    shape = [1] * rank
    shape[int(axis) % rank] = t.numel()
    return t.reshape(shape)


def _quantize(op: Any, c: Ctx) -> tuple[Any, list[Any]]:
    dtype = c.param("output_dtype")
    if dtype not in _RANGES:
        raise UnsupportedError(f"quantize {op.name!r}: output dtype {dtype!r} is not supported")
    lo, hi, torch_dtype = _RANGES[dtype]
    scale = _per_axis(c.tensor("scale"), op, c, op.input)
    zero = _per_axis(c.tensor("zero_point"), op, c, op.input)
    zero_f = None if zero is None else zero.to(torch.float32)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.to(torch.float32) / scale)  # half to even
        if zero_f is not None:
            q = q + zero_f
        return torch.clamp(q, lo, hi).to(torch_dtype)
    return quantize, [op.input]


def _dequantize(op: Any, c: Ctx) -> tuple[Any, list[Any]]:
    scale = _per_axis(c.tensor("scale"), op, c, op.input)
    zero = _per_axis(c.tensor("zero_point"), op, c, op.input)
    zero_f = None if zero is None else zero.to(torch.float32)

    def dequantize(q: torch.Tensor) -> torch.Tensor:
        y = q.to(torch.float32)
        if zero_f is not None:
            y = y - zero_f
        return y * scale
    return dequantize, [op.input]


QUANT_OPS: dict[str, Builder] = {"quantize": _quantize, "dequantize": _dequantize}
