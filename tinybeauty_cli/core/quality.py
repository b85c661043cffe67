"""The formulas every stage shares, in one place: the made-up image a residual gives, and PSNR
(per image, against 8-bit targets, and fidelity between two models' float outputs).

* **PSNR against targets** is computed on the made-up image as an app would save it
  (rounded to 8 bits) against the 8-bit target, per image, then averaged (dB).
* **Fidelity** compares two models' made-up images in float, before rounding (range
  [-1, 1], so peak-to-peak 2), per image then averaged: rounding would hide
  differences below half a grey level, and identical outputs would read as infinite.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

T = TypeVar("T")


def made_up(x: T, out: T, output: str = "residual") -> T:
    """The made-up image ``clamp(x + r, -1, 1)`` from a network's output ``out`` (a residual ``r``,
    or, for ``output="image"``, the image itself). Works on numpy arrays and torch tensors alike."""
    y = out if output == "image" else x + out
    if isinstance(y, np.ndarray):
        return np.clip(y, -1.0, 1.0)
    return y.clamp(-1.0, 1.0)  # a torch tensor (torch is not imported here: the CLI imports this module)


#: Images per slice in the per-image loops below: a slice's temporaries stay in the CPU cache,
#: where whole-batch float64 temporaries (hundreds of MB for 100 images) cost more in page faults
#: than the arithmetic. Each image's figure is the same either way.
_SLICE = 8


def psnr_db(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR of each image of a batch (inf where identical). Layout does not matter."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    mse = np.empty(a.shape[0], np.float64)
    for i in range(0, a.shape[0], _SLICE):
        mse[i:i + _SLICE] = _mse(a[i:i + _SLICE], b[i:i + _SLICE])
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared difference of each image, in float64."""
    n = a.shape[0]
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        # 8-bit images: squares of int32 differences are exact, and so is their float64 sum
        # (below 2**53), so this equals the float64 mean bit for bit, without float64 copies.
        d = a.astype(np.int32) - b
        return (d * d).reshape(n, -1).sum(axis=1, dtype=np.int64) / d[0].size
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return (d * d).reshape(n, -1).mean(axis=1)


#: Identical images have infinite PSNR; averages cap each image here.
PSNR_CAP_DB = 150.0


def mean_psnr_db(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean over images of per-image PSNR (each capped at :data:`PSNR_CAP_DB`)."""
    return float(np.mean(np.minimum(psnr_db(a, b, data_range), PSNR_CAP_DB)))


def fidelity_per_image_db(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fidelity of each image: PSNR between two models' float made-up images in [-1, 1] (peak to
    peak 2), capped at :data:`PSNR_CAP_DB` where they are identical."""
    return np.minimum(psnr_db(a, b, data_range=2.0), PSNR_CAP_DB)


def fidelity_psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fidelity (dB) over a batch: what every command reports as "fidelity"."""
    return float(np.mean(fidelity_per_image_db(a, b)))


def worst_fidelity_db(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest per-image fidelity (dB) of a batch."""
    return float(np.min(fidelity_per_image_db(a, b)))
