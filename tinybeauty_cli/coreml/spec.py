"""Core ML files on any platform: quiet coremltools, compact graphs, decompressed weights, sizes.

Everything here works on Linux (no Core ML runtime needed): it reads and rewrites the
protobuf specification and the weight file of a ``.mlmodel`` (NeuralNetwork) or an
``.mlpackage`` (ML Program).

* :func:`compact_program` / :func:`compact_neural_network` shrink the graph description:
  identical scalar constants are shared (coremltools writes a fresh ``const`` op, with its
  own long name, for every ``strides=[1, 1]``), and every internal variable, op and layer
  gets a short name. Model inputs and outputs keep their names.
* :func:`inline_small_weights` stores small float tensors (biases, norm scales, palettes)
  inside the graph description instead of as blobs: each blob in ``weight.bin`` carries a
  64-byte header and 64-byte alignment plus a file reference in the graph, which costs
  more than a 24-element fp16 vector itself.
* :func:`program_weights` / :func:`neural_network_weights` return every weight tensor a file
  holds, decompressed (palettes looked up, int8 scaled, sparse tensors expanded) exactly as
  Core ML will see them.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: Float tensors up to this many elements are written inside the graph description.
INLINE_MAX_ELEMENTS = 256
#: Where an ML Program package keeps its graph description and weights.
PACKAGE_DATA = Path("Data") / "com.apple.CoreML"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence coremltools: its import-time notes, progress bars, prints and warnings.

    coremltools writes tqdm bars to stderr and some utilities ``print`` to stdout, which
    would corrupt ``--json`` output; nothing it says here is actionable for a tbopt user.
    """
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def coremltools():  # noqa: ANN201 - the module
    """Import coremltools quietly (it warns about untested torch/scikit-learn versions on import)."""
    with quiet():
        import coremltools as ct  # noqa: PLC0415 - heavy import, only where needed
    return ct


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


# --- weights, decompressed ----------------------------------------------------------------------------


@dataclass
class FileWeight:
    """One weight tensor of a Core ML file, as Core ML computes with it."""

    name: str  # op / layer field it feeds, for messages
    value: np.ndarray  # float32, decompressed
    storage: str  # "fp16", "fp32", "palettized 4-bit", "int8 per-channel", "sparse+palettized 4-bit", ...


def load_program(path: Path) -> Any:
    """The ML Program of an ``.mlpackage`` as a pymil program (constants readable on Linux)."""
    ct = coremltools()
    with quiet():
        from coremltools.converters.mil.frontend.milproto.load import load  # noqa: PLC0415

        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def _storage_of(op: Any) -> str:
    """How a decompressed weight is stored, from the chain of constexpr ops that produce it."""
    kinds: list[str] = []
    pending = [op]
    while pending:
        cur = pending.pop()
        t = cur.op_type
        lut = cur.inputs.get("lut")
        if lut is not None:
            entries = lut.shape[0] if lut.rank == 1 else lut.shape[-2]
            kinds.append(f"palettized {int(np.log2(entries))}-bit")
        elif "affine_dequantize" in t or "shift_scale" in t:
            kinds.append("int8 linear")
        if "sparse" in t:
            kinds.append("sparse")
        pending.extend(v.op for v in cur.inputs.values()
                       if v is not None and v.op is not None and v.op.op_type.startswith("constexpr_"))
    return "+".join(sorted(dict.fromkeys(kinds), key=lambda k: k != "sparse"))


def program_weights(path: Path) -> list[FileWeight]:
    """Every float tensor (rank >= 1) an ML Program feeds into a computing op, decompressed."""
    prog = load_program(path)
    weights: list[FileWeight] = []
    for op in prog.functions["main"].operations:
        if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
            continue
        for var in op.outputs:
            consumers = [c for c in var.child_ops if not c.op_type.startswith("constexpr_")]
            if not consumers:
                continue
            if op.op_type == "const":
                value = var.val
                storage = None
            else:
                with quiet():
                    value = op.materialized_val_inference()
                if isinstance(value, tuple):
                    value = value[list(op.outputs).index(var)]
                storage = _storage_of(op)
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim == 0:
                continue
            weights.append(FileWeight(f"{consumers[0].op_type}:{var.name}", value.astype(np.float32),
                                      storage or str(value.dtype).replace("float", "fp")))
    return weights


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


def neural_network_weights(spec: Any) -> list[FileWeight]:
    """Every weight tensor of a NeuralNetwork spec, decompressed to float32."""
    coremltools()
    weights: list[FileWeight] = []

    def add(layer: Any, field: str, wp: Any, shape: tuple[int, ...], axis: int = 0) -> None:
        got = _weight_param_value(wp, shape, axis)
        if got is not None:
            weights.append(FileWeight(f"{layer.name}.{field}", got[0], got[1]))

    for layer in spec.neuralNetwork.layers:
        kind = layer.WhichOneof("layer")
        p = getattr(layer, kind)
        if kind == "convolution":
            kh, kw = p.kernelSize
            if p.isDeconvolution:
                shape = (p.kernelChannels, p.outputChannels // p.nGroups, kh, kw)
                add(layer, "weights", p.weights, shape, axis=1)
            else:
                add(layer, "weights", p.weights, (p.outputChannels, p.kernelChannels, kh, kw))
            if p.hasBias:
                add(layer, "bias", p.bias, (p.outputChannels,))
        elif kind == "innerProduct":
            add(layer, "weights", p.weights, (p.outputChannels, p.inputChannels))
            if p.hasBias:
                add(layer, "bias", p.bias, (p.outputChannels,))
        elif kind == "batchnorm":
            for field in ("gamma", "beta", "mean", "variance"):
                add(layer, field, getattr(p, field), (p.channels,))
        elif kind in ("loadConstantND", "loadConstant"):
            add(layer, "data", p.data, tuple(int(s) for s in p.shape))
        elif kind == "scale":
            add(layer, "scale", p.scale, tuple(int(s) for s in p.shapeScale))
            if p.hasBias:
                add(layer, "bias", p.bias, tuple(int(s) for s in p.shapeBias))
        elif kind == "bias":
            add(layer, "bias", p.bias, tuple(int(s) for s in p.shape))
    return weights


def _is_repeated(field: Any) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5 (upb)
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED  # pragma: no cover - older protobuf


def neural_network_weight_bytes(spec: Any) -> int:
    """Bytes of weight payload in a NeuralNetwork spec (values, raw quantized bytes, palettes, scales)."""
    total = 0

    def visit(msg: Any) -> None:
        nonlocal total
        for field, value in msg.ListFields():
            if field.message_type is None:
                continue
            values = value if _is_repeated(field) else [value]
            if field.message_type.name == "WeightParams":
                total += sum(v.ByteSize() for v in values)
            else:
                for v in values:
                    visit(v)

    for layer in spec.neuralNetwork.layers:
        visit(layer)
    return total


# --- sizes -----------------------------------------------------------------------------------------------


def package_parts(path: Path) -> tuple[Path, Path | None]:
    """(graph description, weight file or None) of an ``.mlpackage``."""
    data = Path(path) / PACKAGE_DATA
    weights = data / "weights" / "weight.bin"
    return data / "model.mlmodel", (weights if weights.is_file() else None)
