"""Palettes: the k-means look-up table ``tbopt export --weights palN`` stores for each convolution
weight (scikit-learn k-means in 1-D), and fitting a model onto its palettes before export
(``--fit-palettes N``).

A tensor with no more distinct values than palette entries is stored exactly, not re-clustered,
so weights fitted to a palette beforehand keep their values. Fitting wins back what snapping
trained weights to ``2**bits`` values costs (about half a dB for 16 values on a compact
TinyBeauty) the way weight sharing is usually trained: every weight keeps its k-means cluster,
and the palette values (with the biases and norm scales) are fine-tuned.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up
from ..core.training import BatchFn, FitConfig, distillation_batches, fit

#: The layers whose weights are palettized (the ops ``tbopt export`` compresses).
PALETTIZED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear)
#: Fit images (the first ones, unflipped) on which the palette error is measured before and after.
ERROR_IMAGES = 8


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
    """What fitting onto palettes did. The palette error is the mean absolute difference between
    the made-up images of the palettized model and of the model before (fit images, [-1, 1])."""

    bits: int | dict[str, int]  # one size, or each layer's (``--bits-by-layer``)
    layers: int
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    error_before: float | None = None  # weights snapped to their k-means palettes, not trained
    error_after: float | None = None
    images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        r = (lambda v: None if v is None else round(float(v), 6))
        # bits by layer: the sizes in the model's layer order (names would cost the file a line each)
        bits = self.bits if isinstance(self.bits, int) else list(self.bits.values())
        return {"bits": bits, "layers": self.layers, "steps": self.steps, "images": self.images,
                "palette_error_before": r(self.error_before), "palette_error_after": r(self.error_after),
                "first_loss": r(self.losses[0]) if self.losses else None,
                "final_loss": r(self.losses[-1]) if self.losses else None, "seconds": round(self.seconds, 2)}


def fit_palettes(model: nn.Module, bits: int | Mapping[str, int], batch_fn: BatchFn, cfg: FitConfig,
                 on_step: Callable[[int, float], None] | None = None,
                 snapped: Callable[[nn.Module], None] | None = None) -> PaletteFit:
    """Cluster every conv/linear weight of ``model`` to ``2**bits`` values and fine-tune, in place.
    ``bits`` is one size for every layer or a size by layer name (``model.named_modules()``).

    Clusters come from :func:`kmeans_lut` on the fp16-rounded weights (what the export
    sees); exact zeros stay in a cluster of their own only if the k-means puts them there.
    Training (:func:`~tinybeauty_cli.core.training.fit`: the loss of ``cfg`` on made-up images against the
    targets ``batch_fn`` gives) updates the palette values, biases and norm parameters.
    ``snapped`` is called with the model once its weights are snapped, before training.
    With ``cfg.steps == 0`` the weights are only snapped.
    """
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, PALETTIZED)]
    layers = [m for _, m in named]
    for name, layer in named:
        w = layer.weight.detach()
        lut, idx = kmeans_lut(w.numpy().astype(np.float16), bits if isinstance(bits, int) else bits[name])
        palette = _Palette(torch.from_numpy(lut).to(w.dtype), torch.from_numpy(idx.astype(np.int64)), tuple(w.shape))
        parametrize.register_parametrization(layer, "weight", palette, unsafe=True)
    trainable = [p for n, p in model.named_parameters() if not n.endswith(".original")]
    losses: list[float] = []
    try:
        if snapped is not None:
            snapped(model)
        if cfg.steps > 0:
            losses = fit(model, batch_fn, cfg, params=trainable, on_step=on_step).losses
    finally:
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        model.eval()
    return PaletteFit(bits if isinstance(bits, int) else dict(bits), len(layers), cfg.steps, losses)


def palettes_fitted(model: nn.Module, bits: int | Mapping[str, int], images: torch.Tensor, *, steps: int,
                    seed: int = 0,
                    lr: float = 1e-3, batch_size: int = 2,
                    progress: Progress | None = None,
                    teacher: nn.Module | None = None) -> tuple[nn.Module, PaletteFit]:
    """A copy of ``model`` fitted onto ``2**bits``-value palettes by distillation from ``model``
    (or from ``teacher``: the float model when ``model`` is already on its palettes, e.g. GPTQ's).

    The transform behind ``tbopt export --fit-palettes``: module in, module out (``model`` is
    left as is). ``images``: unlabeled images as the model takes them, float (N, C, S, S);
    each step draws ``batch_size`` of them (randomly flipped) and trains the palettes so the
    copy's made-up images match ``model``'s (L2; Adam, warm-up then cosine decay from ``lr``; on the demo
    model, 300 steps of 4-bit palettes: PSNR 0.18 dB below the float model's with L2 from 1e-3, 0.21
    dB with L1 from 1e-4; channel-pruned at 0.3, 0.38 against 0.42 dB).
    Deterministic for ``seed`` and the number of threads. The copy's conv weights take at
    most ``2**bits`` distinct values each (``bits`` by layer name for ``--bits-by-layer``),
    which the export then stores exactly.
    """
    progress = progress or SilentProgress()
    t0 = time.perf_counter()
    teacher = (teacher if teacher is not None else model).eval()
    student = copy.deepcopy(model)
    held = images[:ERROR_IMAGES]
    with torch.no_grad():
        reference = made_up(held, teacher(held))

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((made_up(held, m.eval()(held)) - reference).abs().mean())

    before: list[float] = []
    cfg = FitConfig(steps=steps, lr=lr, lr_min=lr / 100, warmup=min(10, steps // 5), seed=seed, loss="l2")
    what = f"{bits}-bit palettes" if isinstance(bits, int) else "palettes of bits by layer"
    with progress.task(f"fitting {what}", total=steps) as advance:
        result = fit_palettes(student, bits, distillation_batches(teacher, images, batch_size), cfg,
                              on_step=lambda step, loss: advance(1, loss=loss),
                              snapped=lambda m: before.append(error(m)))
    result.error_before = before[0]
    result.error_after = error(student)
    result.images = len(images)
    result.seconds = time.perf_counter() - t0
    return student.eval(), result
