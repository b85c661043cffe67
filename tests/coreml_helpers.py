"""Helpers the Core ML tests and benchmarks share: the PyTorch twin of a Core ML file and its
convolutions' weights as stored. (Fitting a model onto its palettes is
``tinybeauty_cli.export.palettes.fit_palettes``, behind ``tbopt export --fit-palettes``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinybeauty_cli.core.artifact import Artifact
from tinybeauty_cli.core.checkpoint import LoadedModel
from tinybeauty_cli.core.errors import UnsupportedError
from tinybeauty_cli.coreml.spec import read_coreml
from tinybeauty_cli.coreml.weights import carry_file_weights, stored_weights
from tinybeauty_cli.export.config import ExportConfig
from tinybeauty_cli.export.prepare import coreml_ready_module

# --- the PyTorch twin of a file ------------------------------------------------------------------------


def with_file_weights(module: nn.Module, path: Path | str, size: int) -> nn.Module:
    """``module`` (changed in place) carrying the weights the Core ML file at ``path`` holds."""
    carry_file_weights(module, stored_weights(path), torch.zeros(1, 3, size, size))
    return module


def decompressed_model(coreml_path: Path | str, source: LoadedModel | Artifact) -> nn.Module:
    """A PyTorch model carrying exactly the weights a file written by ``tbopt export`` holds.

    Palettes are looked up, int8 weights scaled, sparse tensors expanded and fp16 values
    kept as rounded. The model maps a float (N, 3, S, S) batch in the input range to the
    residual, like the original network (and is the same function as the Core ML graph
    apart from the compute precision: it runs in fp32). ``source`` is the float model the
    file was exported from; it provides the structure.
    """
    artifact = source.artifact if isinstance(source, LoadedModel) else source
    if artifact is None:
        raise UnsupportedError("decompressed_model needs the float model the file was exported from")
    meta = read_coreml(coreml_path).tbopt_metadata
    config = ExportConfig.from_dict(meta["export"])
    size = int(meta["preprocessing"]["size"])
    module = coreml_ready_module(artifact.build_model(), size, config.format)
    return with_file_weights(module, coreml_path, size).eval()


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
