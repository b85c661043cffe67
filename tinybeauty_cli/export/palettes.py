"""Palettes: the k-means look-up table ``tbopt export --weights palN`` stores for each convolution
weight (scikit-learn k-means in 1-D). A tensor with no more distinct values than palette entries
is stored exactly, not re-clustered, so weights fitted to a palette beforehand keep their values.
"""

from __future__ import annotations

import numpy as np


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
