"""Helpers the Core ML tests share: a module carrying a Core ML file's weights, its convolutions'
weights as stored, and an ML Program of any ops. (The twin of a file tbopt export wrote is
``tinybeauty_cli.flow.export.decompressed_twin``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinybeauty_cli.coreml.spec import coremltools
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
