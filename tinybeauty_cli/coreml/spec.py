"""Reading a Core ML file on any platform: coremltools imported once and quietly, the spec, the MIL
program, what the file declares (format, target, its one input and output, tbopt's metadata), its
graph's op counts and where its bytes are.

Everything here works on Linux (no Core ML runtime needed): it reads the protobuf
specification and the weight file of a ``.mlmodel`` (NeuralNetwork) or an ``.mlpackage``
(ML Program). The reference executors (:mod:`.exec`) and the weight reader (:mod:`.weights`)
build on it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.artifact import Preprocessing
from ..core.errors import ConfigError, InputError, NotImageModelError, UnsupportedError
from ..core.written import WrittenFile

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


@functools.lru_cache(maxsize=1)
def coremltools() -> Any:
    """coremltools, imported once and quietly (on import it warns about untested torch and
    scikit-learn versions and, off macOS, about its missing native extension)."""
    with quiet():
        import coremltools as ct  # noqa: PLC0415 - heavy import, only where needed
    return ct


def private_copy(path: Path | str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A path coremltools may open in place of ``path``, and the temporary folder holding it (or None).

    coremltools opens an ``.mlpackage`` through its ModelPackage library, which rewrites the
    package's ``Manifest.json`` (and needs write access to it) even just to read the spec, even when
    the read then fails. tbopt never writes its inputs, so a package is opened from a private copy
    (files copied, permissions not: the copy is writable). A ``.mlmodel`` file is only read, in place.
    The caller keeps the folder while coremltools needs the copy and cleans it up after.
    """
    path = Path(path)
    if not path.is_dir():
        return str(path), None
    holder = tempfile.TemporaryDirectory(prefix="tbopt-read-")
    try:
        copy = Path(holder.name) / path.name
        copy.mkdir()
        for src in sorted(path.rglob("*")):
            dst = copy / src.relative_to(path)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    except BaseException:
        holder.cleanup()
        raise
    return str(copy), holder


@contextlib.contextmanager
def readable(path: Path | str) -> Iterator[str]:
    """:func:`private_copy` for the length of a block: the path to hand coremltools, removed after."""
    copy, holder = private_copy(path)
    try:
        yield copy
    finally:
        if holder is not None:
            holder.cleanup()


def load_spec(path: Path | str) -> Any:
    """The protobuf specification of a ``.mlmodel`` / ``.mlpackage`` (the file is only read)."""
    ct = coremltools()
    with quiet(), readable(path) as copy:
        return ct.utils.load_spec(copy)


def spec_of_bytes(content: bytes) -> Any:
    """The protobuf specification of a ``.mlmodel`` whose bytes are held (parsed as
    ``coremltools.utils.load_spec`` parses the file)."""
    spec = coremltools().proto.Model_pb2.Model()
    spec.ParseFromString(content)
    return spec


@contextlib.contextmanager
def held(file: WrittenFile) -> Iterator[Path]:
    """A file whose bytes are held in memory, written into a private temporary folder for coremltools
    to open (removed after): the file itself is not read again."""
    with tempfile.TemporaryDirectory(prefix="tbopt-read-") as folder:
        copy = Path(folder) / Path(file.path).name
        file.write_to(copy)
        yield copy


def load_program(path: Path | str) -> Any:
    """The MIL program of an ``.mlpackage``, with its weights, read by coremltools' own loader
    (its constants are readable on Linux)."""
    ct = coremltools()
    try:
        with quiet(), readable(path) as copy:  # a private copy: coremltools rewrites what it opens
            model = ct.models.MLModel(copy, skip_model_load=True)
            kind = model.get_spec().WhichOneof("Type")
            if kind != "mlProgram":
                raise InputError(f"{path} is not an ML Program (it holds a {kind} model)")
            return mil_program(model)  # weights are read here, while the copy exists
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - coremltools raises many kinds on a corrupt package
        raise InputError(f"cannot read the ML Program {path}: {exc}") from exc


def mil_program(mlmodel: Any) -> Any:
    """The MIL program of an ML Program ``MLModel`` (written or still in memory), with its weights,
    read by coremltools' own loader."""
    coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load  # noqa: PLC0415

    spec = mlmodel.get_spec()
    with quiet():
        return load(spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)


def constexpr_values(function: Any) -> dict[str, Any]:
    """Every ``constexpr_*`` output of a MIL function by variable name, decompressed by coremltools'
    own ``materialized_val_inference`` in program order. An op fed by another constexpr op (a
    palette whose table is itself scaled or quantized, as coremltools writes per-channel-scale
    palettes) is given that op's value first, as coremltools' ``WeightDecompressor`` pass does by
    turning each decompressed op into a ``const``."""
    values: dict[str, Any] = {}
    for op in function.operations:
        if not op.op_type.startswith("constexpr_"):
            continue
        for var in op.inputs.values():
            if getattr(var, "name", None) in values and var.val is None:
                known = var.sym_type()
                known.val = values[var.name]
                var._sym_val = known  # what a const in its place would hold
        with quiet():
            vals = op.materialized_val_inference()
        for out, v in zip(op.outputs, vals if isinstance(vals, tuple) else (vals,)):
            values[out.name] = v
    return values


# ---------------------------------------------------------------- what the file declares

#: Core ML specification version -> first OS that runs it.
_SPEC_TARGETS = {1: "iOS11", 2: "iOS11.2", 3: "iOS12", 4: "iOS13", 5: "iOS14", 6: "iOS15", 7: "iOS16",
                 8: "iOS17", 9: "iOS18"}
_ARRAY_TYPES = {65568: "fp32", 65600: "fp64", 65552: "fp16", 131104: "int32"}
_COLOR_SPACES = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}


@dataclass(frozen=True)
class Feature:
    """One declared input or output of a Core ML model."""

    name: str
    kind: str  # "image" | "tensor"
    shape: tuple[int, ...]  # images: (1, channels, height, width)
    dtype: str  # tensors: fp32 / fp16 / ...; images: uint8
    color: str | None = None  # images: RGB / BGR / GRAYSCALE

    def describe(self) -> str:
        if self.kind == "image":
            return f"image {self.name!r} {self.shape[3]}x{self.shape[2]} {self.color} (8-bit)"
        return f"tensor {self.name!r} {tuple(self.shape)} {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
                "color": self.color}


def feature(desc: Any, role: str) -> Feature:
    """A declared input or output (``role``: "input" / "output", for the message of a refusal)."""
    kind = desc.type.WhichOneof("Type")
    if kind == "imageType":
        t = desc.type.imageType
        color = _COLOR_SPACES.get(t.colorSpace, str(t.colorSpace))
        channels = 1 if color.startswith("GRAYSCALE") else 3
        return Feature(desc.name, "image", (1, channels, int(t.height), int(t.width)), "uint8", color)
    if kind == "multiArrayType":
        t = desc.type.multiArrayType
        shape = tuple(int(d) for d in t.shape)
        if not shape and t.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            shape = tuple(int(d) for d in t.enumeratedShapes.shapes[0].shape)
        return Feature(desc.name, "tensor", shape, _ARRAY_TYPES.get(t.dataType, str(t.dataType)))
    raise NotImageModelError(f"the model's {role} {desc.name!r} is a {kind}; tbopt runs image-to-image models")


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


@dataclass
class CoreMLModelFile:
    """A Core ML file as declared: format, spec version, the one input and output, metadata."""

    path: Path
    spec: Any
    format: str  # "mlprogram" | "neuralnetwork"
    input: Feature
    output: Feature
    user_metadata: dict[str, str]
    weights_dir: str | None = None

    @property
    def target(self) -> str:
        return _SPEC_TARGETS.get(self.spec.specificationVersion, f"spec v{self.spec.specificationVersion}")

    @property
    def tbopt_metadata(self) -> dict[str, Any]:
        """tbopt's own keys: ``tbopt`` (a JSON object) and ``tbopt.<key>`` (JSON values)."""
        meta: dict[str, Any] = {}
        if "tbopt" in self.user_metadata:
            blob = _maybe_json(self.user_metadata["tbopt"])
            if isinstance(blob, dict):
                meta.update(blob)
        for k, v in self.user_metadata.items():
            if k.startswith("tbopt."):
                meta[k[len("tbopt."):]] = _maybe_json(v)
        return meta

    @property
    def preprocessing(self) -> Preprocessing:
        """Size from the declared input; value range and tensor-output meaning from tbopt's
        metadata when the file has it ([-1, 1] and a residual otherwise)."""
        size = self.input.shape[-1]
        declared = self.tbopt_metadata.get("preprocessing")
        declared = declared if isinstance(declared, dict) else {}
        output = "image" if self.output.kind == "image" else str(declared.get("output", "residual"))
        try:
            return Preprocessing(size=size, value_range=tuple(declared.get("value_range", (-1.0, 1.0))),
                                 output=output)
        except (ConfigError, TypeError, ValueError) as exc:
            raise UnsupportedError(f"{self.path}: {exc}") from exc


def read_coreml(path: Path | str) -> CoreMLModelFile:
    """Read a ``.mlpackage`` / ``.mlmodel``'s spec and check it is a one-image-in, one-image-out model."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Core ML model {path} does not exist")
    if path.suffix.lower() == ".mlmodel" and path.is_dir():
        raise InputError(f"{path} is a folder; a .mlmodel is a single file")
    if path.suffix.lower() == ".mlpackage" and not path.is_dir():
        raise InputError(f"{path} is not a folder; a .mlpackage is a folder with a Manifest.json")
    ct = coremltools()
    try:
        with quiet(), readable(path) as copy:
            spec = ct.models.MLModel(copy, skip_model_load=True).get_spec()
    except Exception as exc:  # noqa: BLE001 - coremltools raises many kinds on a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read Core ML model {path}: {first}") from exc
    kind = spec.WhichOneof("Type")
    if kind == "mlProgram":
        fmt = "mlprogram"
    elif kind in ("neuralNetwork", "neuralNetworkRegressor"):
        fmt = "neuralnetwork"
    else:
        raise NotImageModelError(f"{path} holds a Core ML {kind} model; tbopt runs image-to-image ML Programs "
                                 f"and NeuralNetworks")
    ins, outs = list(spec.description.input), list(spec.description.output)
    if len(ins) != 1 or len(outs) != 1:
        raise NotImageModelError(f"{path} has {len(ins)} inputs and {len(outs)} outputs; tbopt runs models with one "
                               "image (or tensor) in and one out")
    try:
        inp, out = feature(ins[0], "input"), feature(outs[0], "output")
    except NotImageModelError as exc:
        raise NotImageModelError(f"{path}: {exc}") from None
    if inp.kind == "image" and inp.shape[1] != 3:
        raise NotImageModelError(f"{path}: the input image is {inp.color}; tbopt feeds RGB faces")
    if len(inp.shape) < 3 or inp.shape[-3] != 3 or inp.shape[-1] != inp.shape[-2] or \
            int(np.prod(inp.shape[:-3])) != 1:
        raise NotImageModelError(f"{path}: input {inp.describe()} is not one square 3-channel image; tbopt needs "
                                 f"a model that takes one 3-channel image and returns one")
    _check_output(path, inp, out)
    user = dict(spec.description.metadata.userDefined)
    weights = path / PACKAGE_DATA / "weights"
    weights_dir = str(weights) if fmt == "mlprogram" and weights.is_dir() else None
    return CoreMLModelFile(path, spec, fmt, inp, out, user, weights_dir)


def _check_output(path: Path, inp: Feature, out: Feature) -> None:
    """Refuse a declared output that is not one 3-channel image the size of the input."""
    size = inp.shape[-1]
    if out.kind == "image":
        if out.shape[1] != 3 or out.shape[2:] != (size, size):
            raise NotImageModelError(f"{path}: output {out.describe()} is not a 3-channel {size}x{size} image; "
                                     f"tbopt needs one image out the size of the image in")
        return
    if out.shape and (int(np.prod(out.shape)) != 3 * size * size or len(out.shape) < 3
                      or tuple(out.shape[-3:]) != (3, size, size)):
        raise NotImageModelError(f"{path}: output {out.describe()} is not one 3x{size}x{size} image; "
                                 f"tbopt needs one image out the size of the image in")


def graph_op_counts(spec: Any) -> Counter:
    """Layer types (NeuralNetwork) or op types (ML Program, ``const`` aside) in the graph, as written."""
    if spec.WhichOneof("Type") == "mlProgram":
        fn = spec.mlProgram.functions["main"]
        block = fn.block_specializations[fn.opset]
        return Counter(op.type for op in block.operations if op.type != "const")
    return Counter(layer.WhichOneof("layer") for layer in spec.neuralNetwork.layers)


# ---------------------------------------------------------------- sizes

def package_parts(path: Path) -> tuple[Path, Path | None]:
    """(graph description, weight file or None) of an ``.mlpackage``."""
    data = Path(path) / PACKAGE_DATA
    weights = data / "weights" / "weight.bin"
    return data / "model.mlmodel", (weights if weights.is_file() else None)


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
