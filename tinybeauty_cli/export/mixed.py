"""Bits by layer (``tbopt export --weights palN --bits-by-layer auto``): palettes of N-2 to 8 bits
chosen for each conv/linear weight so that the weights take no more bytes than N bits everywhere
and the made-up images stay closer to the float model's -- a HAWQ-style allocation from measured
sensitivities.

A layer's sensitivity at b bits is the mean squared difference of the made-up images on the
calibration images when only that layer's weight is snapped to its b-bit k-means palette
(:func:`~.palettes.kmeans_lut`, the table the export stores), every other layer float. The
errors of several snapped layers add up nearly (docs/tried-and-measured.md), so the allocation
minimizes the sum under the byte budget of uniform N-bit palettes, exactly, by dynamic
programming over bytes. Layers that carry much of the error get more bits, robust ones fewer. The bytes are counted as the file stores them: 64-byte-aligned blobs
and small tables in an ML Program (:func:`palette_bytes`), packed indices and fp32 tables in a
NeuralNetwork ``.mlmodel`` (:func:`nn_palette_bytes`).

Module in, allocation out: nothing here opens or writes a file or scores evaluation images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up
from ..coreml.compact import INLINE_MAX_ELEMENTS
from ..coreml.weights import layers_in_run_order
from .config import ExportError, palette_bits_for
from .palettes import PALETTIZED, kmeans_lut

#: Calibration images the sensitivities are measured on (the first ones): every candidate of
#: every layer costs a forward pass over them (more chose the same bits: docs/tried-and-measured.md).
SENSITIVITY_IMAGES = 4
#: Sizes tried below N bits: N-1 and N-2 (fewer bits lose more than any layer wins back).
BELOW_UNIFORM = 2
#: Each blob of an ML Program's weight file: a 64-byte header, its data padded to 64 bytes.
_BLOB_ALIGN = 64
#: What a small tensor kept in the graph description costs beyond its data (protobuf framing).
_INLINE_OVERHEAD = 16


def _blob(nbytes: int) -> int:
    return _BLOB_ALIGN + -(-nbytes // _BLOB_ALIGN) * _BLOB_ALIGN


def _varint(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def _field(tag_bytes: int, nbytes: int) -> int:
    """A length-delimited protobuf field: its tag, its length as a varint, its data."""
    return tag_bytes + _varint(nbytes) + nbytes


def nn_palette_bytes(numel: int, bits: int) -> int:
    """Bytes a palettized weight takes in a NeuralNetwork ``.mlmodel`` as coremltools'
    ``quantize_weights`` writes it: a ``WeightParams`` holding the indices packed ``bits`` to a
    byte (``rawValue``, field 30) and its ``QuantizationParams`` (field 40: ``numberOfBits``, and the
    ``2**bits``-entry table as packed fp32 -- ``lookupTableQuantization.floatValue``, fields 102 and
    1; an fp16 export leaves the table fp32). Field numbers above 15 take two bytes of tag. The
    message's own tag and length, in its layer's, are not counted."""
    table = _field(2, _field(1, 4 * (1 << bits)))
    quantization = 2 + table  # numberOfBits: a tag byte and a one-byte varint
    return _field(2, max(1, -(-numel * bits // 8))) + _field(2, quantization)


def palette_bytes(numel: int, out_channels: int, bits: int, group_size: int | None = None,
                  lut_itemsize: int = 2) -> int:
    """Bytes a palettized weight takes in the file: packed ``bits``-bit indices (a blob of the
    weight file) and one ``2**bits``-entry table per tensor (``group_size`` None) or per group of
    output channels (a group size the channels do not divide: their largest common divisor, as the
    export does), in the graph description when small (:func:`~..coreml.compact.inline_small_weights`)."""
    tables = 1 if group_size is None else out_channels // math.gcd(out_channels, group_size)
    entries = tables * (1 << bits)
    lut = entries * lut_itemsize + _INLINE_OVERHEAD if entries <= INLINE_MAX_ELEMENTS else _blob(entries * lut_itemsize)
    return _blob(-(-numel * bits // 8)) + lut


@dataclass
class BitAllocation:
    """The bits of every palettized layer (module names, in the order a forward pass runs them),
    the bytes they take, and the sensitivities they were chosen from."""

    layers: list[str]
    shapes: list[tuple[int, ...]]
    bits: list[int]
    bytes: list[int]
    budget: int  # bytes of the weights at ``uniform_bits`` everywhere, less ``reserve``
    uniform_bits: int
    uniform_bytes: int
    errors: dict[str, dict[int, float]] = field(default_factory=dict)  # layer -> bits -> error
    images: int = 0
    ops: list[str] = field(default_factory=list)  # the program's op of each layer, once paired

    @property
    def by_layer(self) -> dict[str, int]:
        return dict(zip(self.layers, self.bits))

    @property
    def predicted_error(self) -> float:
        """Sum of the chosen layers' errors (mean squared difference of made-up images)."""
        return sum(self.errors[n][b] for n, b in zip(self.layers, self.bits))

    @property
    def uniform_error(self) -> float:
        return sum(e[self.uniform_bits] for e in self.errors.values())

    def record(self) -> str:
        """What the file's ``tbopt.bits_by_layer`` holds: the bits in graph order (compact: every
        byte counts against the budget)."""
        return "[" + ",".join(str(b) for b in self.bits) + "]"

    def to_dict(self) -> dict[str, Any]:
        gain = (10 * math.log10(self.uniform_error / self.predicted_error)
                if self.predicted_error > 0 and self.uniform_error > 0 else None)
        return {
            "uniform_bits": self.uniform_bits, "budget_bytes": self.budget, "uniform_bytes": self.uniform_bytes,
            "weight_bytes": sum(self.bytes), "calibration_images": self.images,
            "predicted_gain_db": None if gain is None else round(gain, 2),
            "layers": [{"layer": n, **({"op": self.ops[i]} if self.ops else {}), "shape": list(s), "bits": b,
                        "bytes": nb} for i, (n, s, b, nb) in enumerate(zip(self.layers, self.shapes, self.bits,
                                                                             self.bytes))],
        }


def _sensitivities(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], images: torch.Tensor,
                   candidates: Sequence[int], group_size: int | None, progress: Progress) -> dict[str, dict[int, float]]:
    """layer -> bits -> mean squared difference of made-up images with only that layer snapped."""
    with torch.no_grad():
        reference = made_up(images, model(images))
    errors: dict[str, dict[int, float]] = {}
    with progress.task("measuring each layer's sensitivity to palettes", total=len(layers) * len(candidates)) as adv:
        for name, layer in layers:
            original = layer.weight.detach().clone()
            w16 = original.numpy().astype(np.float16)  # what the export clusters
            errors[name] = {}
            try:
                for bits in candidates:
                    snapped = np.empty(w16.shape, np.float32)
                    step = w16.shape[0] if group_size is None else math.gcd(w16.shape[0], group_size)
                    for g in range(0, w16.shape[0], step):
                        lut, idx = kmeans_lut(w16[g:g + step], bits)
                        snapped[g:g + step] = lut[idx.astype(np.int64)].reshape(w16[g:g + step].shape)
                    with torch.no_grad():
                        layer.weight.copy_(torch.from_numpy(snapped))
                        out = made_up(images, model(images))
                    errors[name][bits] = float(((out - reference) ** 2).mean())
                    adv(1)
            finally:
                with torch.no_grad():
                    layer.weight.copy_(original)
    return errors


def _cheapest_sum(costs: list[list[int]], values: list[list[float]], budget: int) -> list[int]:
    """Index of one option per item minimizing the sum of values with the sum of costs <= budget
    (dynamic programming over bytes, costs rounded up to units of at most 1/4096 of the budget)."""
    unit = max(1, budget // 4096)
    cap = budget // unit
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for item_costs, item_values in zip(costs, values):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (total, picks) in best.items():
            for i, (c, v) in enumerate(zip(item_costs, item_values)):
                u = used + -(-c // unit)
                if u > cap:
                    continue
                if u not in nxt or total + v < nxt[u][0]:
                    nxt[u] = (total + v, picks + [i])
        if not nxt:
            raise ExportError("no choice of bits per layer fits the budget")
        best = nxt
    return min(best.values(), key=lambda tv: tv[0])[1]


def allocate_bits(model: nn.Module, uniform_bits: int, images: torch.Tensor, *, target: str | None = None,
                  group_size: int | None = None, lut_itemsize: int = 2, reserve: int = 0,
                  neural_network: bool = False, progress: Progress | None = None) -> BitAllocation:
    """Bits for each conv/linear weight of ``model`` (eval mode, as exported) within the bytes of
    ``uniform_bits`` everywhere less ``reserve`` (what the file's record of the choice costs).

    ``images``: calibration images as the model takes them, float (N, C, S, S); the first
    :data:`SENSITIVITY_IMAGES` are used. Sizes from ``uniform_bits - BELOW_UNIFORM`` to 8 bits are
    tried, among those ``target`` allows (3-bit palettes from iOS18 on; None: all).
    ``group_size``: palettes per group of output channels, as ``--group-size``.
    ``neural_network``: bytes as a NeuralNetwork ``.mlmodel`` stores them (:func:`nn_palette_bytes`;
    ``group_size`` and ``lut_itemsize`` do not apply). Deterministic:
    k-means is seeded, and ties go to the choice found first.
    """
    progress = progress or SilentProgress()
    model = model.eval()
    images = images[:SENSITIVITY_IMAGES]
    order = layers_in_run_order(model, images[:1], PALETTIZED)
    name_of = {id(m): n for n, m in model.named_modules()}
    layers = [(name_of[id(m)], m) for m in order]
    if not layers:
        raise ExportError("the model has no conv or linear weights to palettize")
    candidates = tuple(b for b in palette_bits_for(target) if b >= uniform_bits - BELOW_UNIFORM)
    errors = _sensitivities(model, layers, images, candidates, group_size, progress)

    def cost(layer: nn.Module, bits: int) -> int:
        if neural_network:
            return nn_palette_bytes(layer.weight.numel(), bits)
        return palette_bytes(layer.weight.numel(), layer.weight.shape[0], bits, group_size, lut_itemsize)

    costs = [[cost(m, b) for b in candidates] for _, m in layers]
    uniform = sum(cost(m, uniform_bits) for _, m in layers)
    budget = uniform - reserve
    picks = _cheapest_sum(costs, [[errors[n][b] for b in candidates] for n, _ in layers], budget)
    bits = [candidates[i] for i in picks]
    return BitAllocation([n for n, _ in layers], [tuple(m.weight.shape) for _, m in layers], bits,
                         [c[i] for c, i in zip(costs, picks)], budget, uniform_bits, uniform, errors, len(images))


def bits_by_name(model: nn.Module, allocation: BitAllocation, example: torch.Tensor) -> dict[str, int]:
    """Layer name in ``model`` -> bits: ``model``'s palettized layers (a copy of the one the
    allocation was made on, e.g. before batch norms were folded) paired with the allocation's in
    the order a forward pass on ``example`` runs them, shapes checked."""
    order = layers_in_run_order(model, example, PALETTIZED)
    name_of = {id(m): n for n, m in model.named_modules()}
    if len(order) != len(allocation.layers) or any(tuple(m.weight.shape) != s for m, s in zip(order, allocation.shapes)):
        raise ExportError("the model's palettized layers are not those the bits by layer were chosen for")
    return {name_of[id(m)]: b for m, b in zip(order, allocation.bits)}


def pair_with_ops(allocation: BitAllocation, op_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Op (or NeuralNetwork layer) name -> bits, pairing the graph's weight ops (graph order) with
    the allocation's layers (the order a forward pass runs them: the order of the graph), shapes
    checked. ``op_shapes``: each compressed op's weight shape, in graph order."""
    ops = list(op_shapes)
    if len(ops) != len(allocation.layers):
        raise ExportError(f"the program has {len(ops)} weight ops, the model {len(allocation.layers)} palettized "
                          f"layers: bits by layer cannot be paired", hint="use the same bits everywhere")
    for op, name, shape in zip(ops, allocation.layers, allocation.shapes):
        if math.prod(op_shapes[op]) != math.prod(shape):
            raise ExportError(f"op {op!r} {op_shapes[op]} does not match layer {name} {shape}: bits by layer "
                              f"cannot be paired", hint="use the same bits everywhere")
    allocation.ops = ops
    return dict(zip(ops, allocation.bits))
