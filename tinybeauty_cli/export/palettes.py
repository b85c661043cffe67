"""Palettes: k-means look-up tables for weights, and fine-tuning a model onto them.

:func:`kmeans_lut` is the palette ``tbopt export --weights palN`` stores for each convolution
weight (scikit-learn k-means in 1-D). Snapping trained weights to 16 values costs a
compact TinyBeauty about half a dB; :func:`fit_palettes` wins it back the way weight
sharing is usually trained: every weight keeps its cluster, and the palette values (with
the biases and norm scales) are fine-tuned. The result is a float model whose convolution
weights take at most ``2**bits`` distinct values each, which the export then stores
exactly (a tensor with no more distinct values than palette entries is not re-clustered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.training import BatchFn, FitConfig, fit

#: The layers whose weights are palettized (as in ``tbopt export``).
PALETTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear)


def kmeans_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2**nbits-entry palette for ``values`` by 1-D k-means (scikit-learn) and each value's index.

    Deterministic (fixed seed). Tensors with no more distinct values than entries are
    stored exactly. Returns (lut float32 of 2**nbits entries, sorted; indices uint8, flat, C order).
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - ships with scikit-learn

    flat = np.asarray(values, np.float64).reshape(-1)
    entries = 1 << nbits
    unique, inverse = np.unique(flat, return_inverse=True)
    lut = np.zeros(entries, np.float64)
    if len(unique) <= entries:
        lut[: len(unique)] = unique
        return lut.astype(np.float32), inverse.reshape(-1).astype(np.uint8)
    km = KMeans(n_clusters=entries, init="k-means++", n_init=3, tol=1e-6, random_state=0)
    with threadpool_limits(1):  # a few thousand 1-D points: OpenMP threads only add overhead
        km.fit(flat.reshape(-1, 1))
    centers = km.cluster_centers_.reshape(-1)
    order = np.argsort(centers)  # sorted palette: indices grow with the value
    rank = np.empty_like(order)
    rank[order] = np.arange(entries)
    return centers[order].astype(np.float32), rank[km.labels_].astype(np.uint8)


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
