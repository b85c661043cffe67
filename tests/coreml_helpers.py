"""Helpers the Core ML tests and benchmarks share: the PyTorch twin of a Core ML file, its
convolutions' weights as stored, and fine-tuning a model onto weight palettes.

:func:`fit_palettes` wins back what snapping trained weights to ``2**bits`` values costs (about
half a dB for 16 values on a compact TinyBeauty) the way weight sharing is usually trained:
every weight keeps its cluster, and the palette values (with the biases and norm scales) are
fine-tuned. The result is a float model whose convolution weights take at most ``2**bits``
distinct values each, which ``tbopt export --weights palN`` then stores exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from tinybeauty_cli.core.artifact import Artifact
from tinybeauty_cli.core.checkpoint import LoadedModel
from tinybeauty_cli.core.errors import UnsupportedError
from tinybeauty_cli.core.training import BatchFn, FitConfig, fit
from tinybeauty_cli.coreml.spec import read_coreml
from tinybeauty_cli.coreml.weights import carry_file_weights, stored_weights
from tinybeauty_cli.export.config import ExportConfig
from tinybeauty_cli.export.palettes import kmeans_lut
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


# --- fine-tuning onto palettes ---------------------------------------------------------------------------

#: The layers whose weights are palettized (as in ``tbopt export``).
PALETTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear)


class _Palette(nn.Module):
    """weight = lut[labels]: the cluster of every weight is fixed, the palette is trained."""

    def __init__(self, lut: torch.Tensor, labels: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        self.lut = nn.Parameter(lut)
        self.register_buffer("labels", labels)
        self.shape = shape

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.lut[self.labels].reshape(self.shape)


@dataclass
class PaletteFit:
    bits: int
    layers: int
    losses: list[float]

    def to_dict(self) -> dict:
        return {"bits": self.bits, "layers": self.layers, "final_loss": self.losses[-1] if self.losses else None}


def fit_palettes(model: nn.Module, bits: int, batch_fn: BatchFn, cfg: FitConfig,
                 on_step: Callable[[int, float], None] | None = None) -> PaletteFit:
    """Cluster every conv/linear weight of ``model`` to ``2**bits`` values and fine-tune (in place).

    Clusters come from :func:`kmeans_lut` on the fp16-rounded weights (what the export
    sees); exact zeros stay in a cluster of their own only if the k-means puts them there.
    Training (:func:`~tinybeauty_cli.training.fit`: L1 on made-up images) updates the palette
    values, biases and norm parameters. With ``cfg.steps == 0`` the weights are only snapped.
    """
    layers = [m for m in model.modules() if isinstance(m, PALETTIZED)]
    for layer in layers:
        w = layer.weight.detach()
        lut, idx = kmeans_lut(w.numpy().astype(np.float16), bits)
        palette = _Palette(torch.from_numpy(lut).to(w.dtype), torch.from_numpy(idx.astype(np.int64)), tuple(w.shape))
        parametrize.register_parametrization(layer, "weight", palette, unsafe=True)
    trainable = [p for n, p in model.named_parameters() if not n.endswith(".original")]
    losses: list[float] = []
    try:
        if cfg.steps > 0:
            losses = fit(model, batch_fn, cfg, params=trainable, on_step=on_step).losses
    finally:
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        model.eval()
    return PaletteFit(bits, len(layers), losses)
