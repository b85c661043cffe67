"""Compact Core ML graphs: what tbopt export does to the graph description before it writes it.

* :func:`compact_program` / :func:`compact_neural_network` shrink the graph description:
  identical scalar constants are shared (coremltools writes a fresh ``const`` op, with its
  own long name, for every ``strides=[1, 1]``), and every internal variable, op and layer
  gets a short name. Model inputs and outputs keep their names.
* :func:`inline_small_weights` stores small float tensors (biases, norm scales, palettes)
  inside the graph description instead of as blobs: each blob in ``weight.bin`` carries a
  64-byte header and 64-byte alignment plus a file reference in the graph, which costs
  more than a 24-element fp16 vector itself.
"""

from __future__ import annotations

import contextlib
import itertools
import string
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .spec import coremltools

#: Float tensors up to this many elements are written inside the graph description.
INLINE_MAX_ELEMENTS = 256


# --- small weights inside the graph description ---------------------------------------------------


@contextlib.contextmanager
def inline_small_weights(max_elements: int = INLINE_MAX_ELEMENTS) -> Iterator[bool]:
    """While active, ML Program serialization keeps small float tensors out of ``weight.bin``.

    coremltools decides per constant with ``should_use_weight_file`` (blob if >= 10
    elements). This wraps that decision; if a future coremltools moves it, the files are
    simply written the default way (yields False).
    """
    coremltools()
    try:
        from coremltools.converters.mil.backend.mil import load as backend  # noqa: PLC0415
    except ImportError:  # pragma: no cover - depends on the coremltools version
        yield False
        return
    original = getattr(backend, "should_use_weight_file", None)
    if original is None:  # pragma: no cover
        yield False
        return

    def decide(val: Any, *args: Any, **kwargs: Any) -> bool:
        if not original(val, *args, **kwargs):
            return False
        small_float = (isinstance(val, (np.ndarray, np.generic)) and val.dtype.kind == "f"
                       and val.size <= max_elements)
        return not small_float

    backend.should_use_weight_file = decide
    try:
        yield True
    finally:
        backend.should_use_weight_file = original


# --- short names ------------------------------------------------------------------------------------


def short_names(reserved: set[str]) -> Iterator[str]:
    """a, b, ..., Z, aa, ab, ...: valid identifiers, skipping ``reserved``."""
    first = string.ascii_letters
    rest = string.ascii_letters + string.digits
    for length in itertools.count(1):
        for head in first:
            for tail in itertools.product(rest, repeat=length - 1):
                name = head + "".join(tail)
                if name not in reserved:
                    yield name


@dataclass
class CompactionResult:
    """What compaction did: graph description bytes before and after, constants shared, names shortened."""

    bytes_before: int
    bytes_after: int
    shared_constants: int  # const ops removed because an identical one exists
    renamed: int


def _main_block(spec: Any) -> Any:
    fn = spec.mlProgram.functions["main"]
    return fn, fn.block_specializations[fn.opset]


def compact_program(spec: Any) -> CompactionResult:
    """Share identical immediate constants and give internal names short ones (ML Program, in place)."""
    before = spec.ByteSize()
    fn, block = _main_block(spec)
    if any(len(op.blocks) for op in block.operations):
        return CompactionResult(before, before, 0, 0)  # control flow: leave it as written
    keep = {i.name for i in fn.inputs} | set(block.outputs)

    # 1. identical immediate constants -> one
    first_with_value: dict[tuple[bytes, bytes], str] = {}
    alias: dict[str, str] = {}
    ops = []
    for op in block.operations:
        if op.type == "const" and op.outputs[0].name not in keep:
            val = op.attributes["val"]
            if val.WhichOneof("value") == "immediateValue":
                key = (val.SerializeToString(deterministic=True),
                       op.outputs[0].type.SerializeToString(deterministic=True))
                if key in first_with_value:
                    alias[op.outputs[0].name] = first_with_value[key]
                    continue
                first_with_value[key] = op.outputs[0].name
        ops.append(op)

    # 2. short names for everything but the model's inputs and outputs
    names = short_names(keep)
    mapping: dict[str, str] = {}
    for op in ops:
        for out in op.outputs:
            mapping[out.name] = out.name if out.name in keep else next(names)

    def resolve(name: str) -> str:
        name = alias.get(name, name)
        return mapping.get(name, name)

    for op in ops:
        for arg in op.inputs.values():
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    binding.name = resolve(binding.name)
        for out in op.outputs:
            out.name = mapping[out.name]
        if "name" in op.attributes:
            values = op.attributes["name"].immediateValue.tensor.strings.values
            if len(values) == 1:
                values[0] = op.outputs[0].name if op.outputs else next(names)
    for i, name in enumerate(block.outputs):
        block.outputs[i] = resolve(name)
    del block.operations[:]
    block.operations.extend(ops)
    return CompactionResult(before, spec.ByteSize(), len(alias), len(mapping))


def compact_neural_network(spec: Any) -> CompactionResult:
    """Short layer and blob names in a NeuralNetwork spec (in place); inputs/outputs keep theirs."""
    before = spec.ByteSize()
    nn_spec = spec.neuralNetwork
    keep = {f.name for f in spec.description.input} | {f.name for f in spec.description.output}
    names = short_names(keep)
    blobs: dict[str, str] = {}

    def blob(name: str) -> str:
        if name in keep:
            return name
        if name not in blobs:
            blobs[name] = next(names)
        return blobs[name]

    for layer in nn_spec.layers:
        for i, name in enumerate(layer.input):
            layer.input[i] = blob(name)
        for i, name in enumerate(layer.output):
            layer.output[i] = blob(name)
        layer.name = layer.output[0] if layer.output else next(names)
    return CompactionResult(before, spec.ByteSize(), 0, len(blobs))
