"""Whether an opened model can be right: finite weights, and a probe image in giving one finite
3-channel image of the same size out.

A file can load cleanly and still be useless: weights holding NaN or Inf (a diverged training
run, a bad conversion) give garbage images without an error, and a TorchScript or Core ML file
of some other network takes or returns tensors of another shape. Opening a model therefore
checks both (:mod:`.checkpoint` for PyTorch files, ``coreml.runner`` for Core ML files); every
command that writes or scores refuses such a model with one line, and ``tbopt info`` reports
the problem instead. What a model computes on real images is checked again where it is
scored or written (:func:`require_finite_output`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .errors import NotImageModelError, UnusableModelError


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point (or quantized) tensors holding a NaN or an Inf."""
    names = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_quantized:
            t = t.dequantize()
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            names.append(name)
    return names


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def nonfinite_weights_problem(label: object, names: list[str]) -> str:
    """The one line that says which tensors of ``label`` hold NaN or Inf."""
    return (f"{label}: {len(names)} weight tensor(s) hold NaN or Inf ({_some(names)}); "
            f"a model with such weights cannot give a usable image")


def probe_input(size: int) -> np.ndarray:
    """A fixed, smooth (1, 3, size, size) float32 image in [-0.8, 0.8]: the test input every opened model
    is run on once (deterministic, so the check does not depend on the machine or a seed)."""
    ramp = np.linspace(-0.8, 0.8, size, dtype=np.float32)
    xx, yy = np.meshgrid(ramp, ramp)
    return np.stack([xx, yy, (xx + yy) / 2])[None].astype(np.float32)


def output_problem(label: object, y: Any, size: int) -> tuple[type, str] | None:
    """What is wrong with a model's output on :func:`probe_input` (error class, one line), or None."""
    shape = tuple(getattr(y, "shape", ()))
    if not hasattr(y, "shape") or shape not in ((1, 3, size, size), (3, size, size)):
        what = f"a tensor of shape {shape}" if hasattr(y, "shape") else f"a {type(y).__name__}"
        return NotImageModelError, (f"{label} returns {what} for a (1, 3, {size}, {size}) image; tbopt needs a "
                                    f"model that returns one 3-channel image of the same size")
    a = np.asarray(y, dtype=np.float64)
    if not np.isfinite(a).all():
        return UnusableModelError, (f"{label} computes NaN or Inf on a plain test image "
                                    f"({int((~np.isfinite(a)).sum())} of {a.size} values); its weights cannot be right")
    return None


def require_finite_output(label: object, outputs: np.ndarray, names: list[str] | None = None) -> None:
    """Refuse outputs (N, ...) holding NaN or Inf, naming the first image that gave them."""
    bad = ~np.isfinite(np.asarray(outputs).reshape(len(outputs), -1)).all(axis=1) if len(outputs) else []
    if np.any(bad):
        first = int(np.argmax(bad))
        which = names[first] if names and first < len(names) else f"image {first + 1}"
        raise UnusableModelError(f"{label} computes NaN or Inf on {which} ({int(np.sum(bad))} of {len(outputs)} "
                                 f"image(s)); its weights cannot be right")
