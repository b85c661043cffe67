"""Helpers the Core ML tests share: a module carrying a Core ML file's weights, its convolutions'
weights as stored, and an ML Program of any ops. (The twin of a file tbopt export wrote is
``tinybeauty_cli.flow.export.decompressed_twin``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
import torch
from torch import nn

from tinybeauty_cli.coreml import runner as cr
from tinybeauty_cli.coreml.spec import coremltools, read_coreml
from tinybeauty_cli.coreml.weights import carry_file_weights, stored_weights

from tests.helpers import COREML_SIZE

# --- the PyTorch twin of a file ------------------------------------------------------------------------


def with_file_weights(module: nn.Module, path: Path | str, size: int) -> nn.Module:
    """``module`` (changed in place) carrying the weights the Core ML file at ``path`` holds."""
    carry_file_weights(module, stored_weights(path), torch.zeros(1, 3, size, size))
    return module


@dataclass
class ConvWeights:
    """The decompressed weight and bias of one (transposed) convolution, in graph order."""

    name: str
    weight: np.ndarray
    bias: np.ndarray | None


def conv_weights(path: Path | str) -> list[ConvWeights]:
    """Every convolution's weights as the file stores them (decompressed), in graph order."""
    convs: list[ConvWeights] = []
    for w in stored_weights(path):
        if w.conv == "weight":
            convs.append(ConvWeights(w.op, w.value, None))
        elif w.conv == "bias" and convs and convs[-1].name == w.op:
            convs[-1].bias = w.value
    return convs


def save_mil_program(folder: Path, body, size: int = COREML_SIZE) -> Path:
    """An fp32 ML Program of one (1, 3, size, size) input whose graph is ``body(mb, x)``, saved as
    ``folder/custom.mlpackage``: ops tbopt's exporter never writes."""
    from coremltools.converters.mil import Builder as mb

    ct = coremltools()

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, size, size))], opset_version=ct.target.iOS16)
    def prog(x):
        return body(mb, x)

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32)
    path = folder / "custom.mlpackage"
    ml.save(str(path))
    return path


# --- Core ML itself, stood in for off macOS ------------------------------------------------------------

ct = coremltools()
_REAL_MLMODEL = ct.models.MLModel


class StandInMLModel(_REAL_MLMODEL):
    """coremltools' MLModel with ``predict`` computed by the reference executor (no Core ML needed)."""

    loads: list["StandInMLModel"] = []
    fail_load: str | None = None
    fail_predict: str | None = None

    def __init__(self, model, *args, skip_model_load: bool = False, compute_units=None, **kwargs):
        super().__init__(model, *args, skip_model_load=True,
                         compute_units=ct.ComputeUnit.ALL if compute_units is None else compute_units, **kwargs)
        self.feeds: list[dict] = []
        if skip_model_load or not isinstance(model, (str, Path)):  # read only, or a spec being built
            return
        if StandInMLModel.fail_load:
            raise RuntimeError(StandInMLModel.fail_load)
        self.reference = cr.ReferenceBackend(read_coreml(model))
        StandInMLModel.loads.append(self)

    def predict(self, data: dict, **_: object) -> dict:
        if StandInMLModel.fail_predict:
            raise RuntimeError(StandInMLModel.fail_predict)
        self.feeds.append(data)
        m = self.reference.model
        value = data[m.input.name]  # a KeyError, as Core ML refuses a missing input
        if m.input.kind == "image":
            assert isinstance(value, Image.Image) and value.mode == "RGB"
            assert value.size == (m.input.shape[3], m.input.shape[2])
            feed = np.asarray(value, np.float32).transpose(2, 0, 1)[None]
        else:
            feed = np.asarray(value, np.float32)
        out = self.reference.run(feed)
        if m.output.kind == "image":
            pixels = np.clip(np.rint(out[0].transpose(1, 2, 0)), 0, 255).astype(np.uint8)
            return {m.output.name: Image.fromarray(pixels, "RGB")}
        return {m.output.name: out.astype(np.float16 if m.output.dtype == "fp16" else np.float32)}
