"""Run Core ML models (``.mlpackage`` ML Programs, ``.mlmodel`` NeuralNetworks) behind the Runner interface.

On macOS with Core ML, predictions come from Core ML itself
(``coremltools.models.MLModel``, with a choice of compute units). Everywhere else --
coremltools can convert and read models on Linux but not run them -- a **reference
executor** reads the model's own graph and weights and evaluates it with PyTorch
(:mod:`.exec`). Its numbers are the model's arithmetic on this CPU,
not the device's: every time measured with it is labelled :data:`REFERENCE_ENGINE`.

Images cross the boundary as Core ML moves them: an image input is an 8-bit RGB or BGR
pixel buffer (the network's ``scale``/``bias`` are applied by the model itself), an
image output is produced as 0..255 and stored in 8 bits (rounded, clamped). Tensor
inputs take the model-space batch in [-1, 1]; a tensor output is the residual unless
the model's tbopt metadata says it returns the made-up image.
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError, NotImageModelError, TbOptError, UnsupportedError, UnusableModelError
from ..core.runner import Runner
from ..core.sanity import output_problem, probe_input
from .spec import CoreMLModelFile, coremltools, load_program, private_copy, read_coreml
from .units import ComputeUnits, parse_compute_units
from .weights import stored_weights

#: How every figure computed by the reference executor is labelled (it is not device latency).
REFERENCE_ENGINE = "Core ML reference executor (not device)"


def coreml_available() -> bool:
    """True where Core ML itself can run predictions: macOS with coremltools' native extension."""
    if sys.platform != "darwin":
        return False
    try:
        coremltools()  # the one quiet import first
        from coremltools import libcoremlpython  # noqa: F401 - present only where Core ML can predict
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- backends

class _Backend(abc.ABC):
    """Runs one (1, 3, S, S) example: an image input gets 0..255 RGB pixels, a tensor input the
    model-space values; returns image outputs as 0..255 RGB floats, tensors as they come."""

    engine: str
    notes: list[str]
    #: True when Core ML itself computes (device latency); False for the reference executor.
    on_device: bool = False

    @abc.abstractmethod
    def run(self, feed: np.ndarray) -> np.ndarray:
        """The model's output for one example."""


class ReferenceBackend(_Backend):
    """The reference executor (:mod:`.exec`)."""

    def __init__(self, model: CoreMLModelFile, fp16_emulation: bool = False):
        self.model = model
        self.notes = []
        if model.format == "mlprogram":
            from .exec.mlprogram import MLProgramExecutor

            self.executor: Any = MLProgramExecutor(load_program(model.path), fp16_emulation=fp16_emulation)
            self.precision = self.executor.compute_precision()
            self.scaler = None
            if fp16_emulation and self.precision == "fp32":
                self.notes.append(f"{model.path.name} computes in fp32: --fp16-emulation changes nothing")
        else:
            from .exec.neuralnetwork import NeuralNetworkExecutor, image_scaler

            self.executor = NeuralNetworkExecutor(model.spec, fp16_emulation=fp16_emulation)
            self.precision = "fp16 on GPU / Neural Engine, fp32 on CPU"
            self.scaler = image_scaler(model.spec, model.input.name) if model.input.kind == "image" else None
        emulated = fp16_emulation and self.precision != "fp32"
        self.fp16_emulation = emulated
        self.engine = f"{REFERENCE_ENGINE}, PyTorch fp32" + (" with fp16 rounding after every op" if emulated else "")

    def run(self, feed: np.ndarray) -> np.ndarray:
        inp, out = self.model.input, self.model.output
        t = torch.from_numpy(np.ascontiguousarray(feed, dtype=np.float32))
        if inp.kind == "image":
            if inp.color == "BGR":
                t = t.flip(1)
            if self.scaler is not None:  # NeuralNetwork preprocessing (ML Programs carry it as ops)
                scale, (r, g, b) = self.scaler
                bias = (b, g, r) if inp.color == "BGR" else (r, g, b)
                t = t * scale + torch.tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
        else:
            t = t.reshape(inp.shape)
        y = self.executor.run({inp.name: t})[out.name]
        y = y.float()
        if out.kind == "image":
            y = y.reshape(1, -1, y.shape[-2], y.shape[-1])
            if out.color == "BGR":
                y = y.flip(1)
        return y.numpy()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_device_model(path: Path, compute_units: ComputeUnits) -> Any:
    """``coremltools.models.MLModel`` loaded (compiled) for prediction with ``compute_units``. ``path`` is a
    private copy (:func:`~.spec.private_copy`): coremltools rewrites the ``Manifest.json`` of a package it opens."""
    ct = coremltools()
    return ct.models.MLModel(str(path), compute_units=compute_units.coreml())


class DeviceBackend(_Backend):
    """Core ML itself (macOS only): ``MLModel.predict`` with the chosen compute units."""

    on_device = True

    def __init__(self, model: CoreMLModelFile, compute_units: ComputeUnits):
        self.model = model
        self.notes = []
        self.compute_units = compute_units
        copy, self._copy = private_copy(model.path)  # kept (and removed) with this backend
        try:
            self.mlmodel = load_device_model(Path(copy), compute_units)
        except Exception as exc:  # noqa: BLE001 - Core ML raises anything: one line that names the file
            if self._copy is not None:
                self._copy.cleanup()
            raise InputError(f"Core ML cannot load {model.path} ({compute_units.value}): {_first_line(exc)}") from exc
        self.engine = f"Core ML on device ({compute_units.value})"

    def run(self, feed: np.ndarray) -> np.ndarray:
        from PIL import Image

        inp, out = self.model.input, self.model.output
        if inp.kind == "image":
            value: Any = Image.fromarray(feed[0].transpose(1, 2, 0).astype(np.uint8), "RGB")
        else:
            value = feed.reshape(inp.shape).astype(np.float16 if inp.dtype == "fp16" else np.float32)
        try:
            result = self.mlmodel.predict({inp.name: value})[out.name]
        except Exception as exc:  # noqa: BLE001 - Core ML raises anything: one line that names the file
            raise InputError(f"Core ML prediction failed on {self.model.path.name} ({self.compute_units.value}): "
                             f"{_first_line(exc)}") from exc
        if out.kind == "image":
            return np.asarray(result.convert("RGB"), np.float32).transpose(2, 0, 1)[None]
        return np.asarray(result, np.float32)


# ---------------------------------------------------------------- the runner

@dataclass
class CoreMLRunner(Runner):
    """A Core ML model behind :class:`~tinybeauty_cli.core.runner.Runner`.

    ``round_image_output`` stores an image output in 8 bits as Core ML does; turn it off
    to compare the graph's arithmetic with a float reference below 8-bit resolution.
    """

    model: CoreMLModelFile
    backend: _Backend
    round_image_output: bool = True
    kind: str = "coreml"
    batch_size: int = 8
    notes: list[str] = field(default_factory=list)
    #: Why the model cannot be right (NaN or Inf out of a test image); empty unless opened with check=False.
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.preprocessing = self.model.preprocessing
        self.engine = self.backend.engine

    @property
    def on_device(self) -> bool:
        """True when Core ML itself computes; False when the reference executor does, whose times
        are this CPU's arithmetic, not device latency."""
        return self.backend.on_device

    @property
    def off_device(self) -> bool:
        return not self.on_device

    def _feed(self, x: np.ndarray) -> np.ndarray:
        """Model-space (1, 3, S, S) -> what the backend takes: an 8-bit pixel buffer for an image input, as
        the app hands it to Core ML; the values themselves for a tensor input."""
        if self.model.input.kind == "image":
            lo, hi = self.preprocessing.value_range
            return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.float32)
        return x

    def _one(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) model-space input -> residual."""
        lo, hi = self.preprocessing.value_range
        y = self.backend.run(self._feed(x))
        s = self.preprocessing.size
        if y.size != 3 * s * s:
            raise UnsupportedError(f"{self.model.path}: output {self.model.output.name!r} has shape {y.shape}, "
                                   f"not a 3x{s}x{s} image")
        y = y.reshape(1, 3, s, s)
        if self.model.output.kind == "image":  # 0..255, stored in 8 bits by Core ML
            if self.round_image_output:
                y = np.clip(np.rint(y), 0, 255)
            return y * ((hi - lo) / 255.0) + lo - x
        if self.preprocessing.output == "image":
            return y - x
        return y

    def residual(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        s = self.preprocessing.size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise InputError(f"{self.model.path.name} takes (N, 3, {s}, {s}) batches, got {tuple(x.shape)}")
        return np.concatenate([self._one(x[i:i + 1]) for i in range(len(x))]).astype(np.float32)

    def info(self) -> dict[str, Any]:
        return describe_coreml(self)


def describe_coreml(runner: CoreMLRunner) -> dict[str, Any]:
    """What ``tbopt info`` shows about a Core ML file."""
    m = runner.model
    d: dict[str, Any] = {
        "format": "ML Program (.mlpackage)" if m.format == "mlprogram" else "NeuralNetwork (.mlmodel)",
        "target": f"{m.target} (Core ML spec v{m.spec.specificationVersion})",
        "coreml_input": m.input.describe(),
        "coreml_output": m.output.describe() + (", the made-up image" if m.output.kind == "image" or
                                                runner.preprocessing.output == "image" else ", the residual"),
        "preprocessing": runner.preprocessing.to_dict(),
    }
    reader = runner.backend if isinstance(runner.backend, ReferenceBackend) else None
    if reader is None:  # on device: compile the graph anyway, to list what it holds
        try:
            reader = ReferenceBackend(m)
        except UnsupportedError as exc:
            d["coreml_ops"] = f"not listed ({exc})"
    if reader is not None:
        d["precision"] = reader.precision
        if m.format == "mlprogram" and reader.precision == "fp16":
            fp32 = reader.executor.fp32_op_counts()
            if fp32:  # e.g. the image scaling and post-processing of an fp16 image file
                d["precision"] = "fp16; in fp32: " + ", ".join(f"{k} x{v}" for k, v in sorted(fp32.items()))
        counts = reader.executor.op_counts()
        d["coreml_ops"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        summary = reader.executor.weight_summary()
        stored = summary.get("compressed_tensors") or summary.get("weight_storage") or {}
        d["coreml_weights"] = ", ".join(f"{k} x{v}" for k, v in sorted(stored.items())) or "uncompressed"
        elements = [w.value for w in stored_weights(m.path)]
        total, nonzero = int(sum(a.size for a in elements)), int(sum(np.count_nonzero(a) for a in elements))
        d["coreml_stored_values"] = f"{total:,} weight values in {len(elements)} tensors ({nonzero:,} non-zero)"
    tb = m.tbopt_metadata
    if tb.get("history"):
        d["history"] = tb["history"]
    other = {k: v for k, v in m.user_metadata.items() if not (k == "tbopt" or k.startswith("tbopt."))}
    if other or tb:
        d["metadata"] = {**other, **{f"tbopt.{k}": v for k, v in tb.items() if k != "history"}}
    if runner.notes:
        d["notes"] = list(runner.notes)
    return d


def open_coreml_runner(path: Path | str, *, compute_units: str | ComputeUnits | None = None,
                       fp16_emulation: bool = False, round_image_output: bool = True,
                       use_device: bool | None = None, arch: str | None = None, arch_kwargs: str | None = None,
                       trust_pickle: bool = False, check: bool = True) -> CoreMLRunner:
    """Open a ``.mlpackage`` / ``.mlmodel`` as a :class:`CoreMLRunner`.

    ``use_device``: None picks Core ML where it can run (macOS) and the reference
    executor elsewhere; False forces the reference executor; True requires Core ML.
    ``arch``, ``arch_kwargs`` and ``trust_pickle`` concern checkpoints and are ignored (a
    Core ML file carries its own graph), so commands can pass one set of options to a mix.
    The model is run once on a test image: an output that is not one 3-channel image is refused;
    NaN or Inf in it is refused too, unless ``check`` is False (then it is kept in ``problems``).
    """
    del arch, arch_kwargs, trust_pickle
    units = parse_compute_units(compute_units)
    model = read_coreml(path)
    device = coreml_available() if use_device is None else use_device
    if device and not coreml_available():
        raise UnsupportedError("Core ML prediction needs macOS with Core ML",
                               hint="off macOS, tbopt runs Core ML models with its reference executor")
    notes: list[str] = []
    if device:
        backend: _Backend = DeviceBackend(model, units or ComputeUnits.all)
        if fp16_emulation:
            notes.append("--fp16-emulation applies to the reference executor; Core ML computes in its own precision")
    else:
        backend = ReferenceBackend(model, fp16_emulation=fp16_emulation)
        if units is not None:
            notes.append(f"--compute-units {units.value} has no effect: Core ML prediction needs macOS, so this run "
                         "uses the reference executor on the CPU")
    notes.extend(backend.notes)
    runner = CoreMLRunner(model, backend, round_image_output=round_image_output, notes=notes)
    runner.problems = _probe(runner)
    if runner.problems and check:
        raise UnusableModelError(runner.problems[0], hint="re-export the model; tbopt info shows what it holds")
    return runner


def _probe(runner: CoreMLRunner) -> list[str]:
    """Run the model once on :func:`~..core.sanity.probe_input`: a wrong-shaped output is refused here;
    NaN or Inf in it is returned as a problem."""
    size = runner.preprocessing.size
    try:
        y = runner.backend.run(runner._feed(probe_input(size)))
    except TbOptError as exc:  # e.g. an op the reference executor does not know: say which file
        if type(exc) not in (UnsupportedError, InputError) or str(runner.model.path) in str(exc):
            raise
        raise type(exc)(f"{runner.model.path}: {exc}", exc.hint) from None
    except Exception as exc:  # noqa: BLE001 - whatever the graph raises, it does not run on this image
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise NotImageModelError(f"{runner.model.path} cannot run on a {size}x{size} RGB image "
                                 f"({type(exc).__name__}: {first})") from None
    if np.asarray(y).size == 3 * size * size:
        y = np.asarray(y).reshape(1, 3, size, size)
    found = output_problem(runner.model.path, y, size)
    if found is None:
        return []
    kind, message = found
    if kind is NotImageModelError:
        raise NotImageModelError(message)
    return [message]
