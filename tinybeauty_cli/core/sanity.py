"""Whether an opened model can be right: finite weights, and a probe image in giving one finite
3-channel image of the same size out.

A file can load cleanly and still be useless: weights holding NaN or Inf (a diverged training
run, a bad conversion) give garbage images without an error, and a TorchScript or Core ML file
of some other network takes or returns tensors of another shape. Opening a model therefore
checks both (:mod:`.checkpoint` for PyTorch files, ``coreml.runner`` for Core ML files); every
command that writes or scores refuses such a model with one line, and ``tbopt info`` reports
the problem instead.

A model can pass that check and still compute NaN on faces (a layer that overflows only on
textured images). Every place a model runs on images -- scoring, calibration, validation,
fitting, ``apply`` -- checks what it computed here (:func:`require_finite_output`, or
:func:`require_finite_on` for a module and a batch of images) and refuses it with one
:class:`~.errors.NonFiniteOutputError` naming the model and the image (its file, or e.g.
"built-in test image 3"), before a figure is computed from it or a file written.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import NonFiniteOutputError, NotImageModelError, UnusableModelError


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


def require_finite_output(label: object, outputs: Any, names: Sequence[str] | None = None, *,
                          first: int = 0, total: int | None = None) -> None:
    """Refuse outputs (N, ...) holding NaN or Inf, naming the model ``label`` and the first image that gave
    them (``names``: how messages name the images, e.g. ``ImageSet.image_labels()``). A batch of a larger
    set is checked with ``first``, the index of ``outputs[0]`` among ``names``, and ``total``, the set's size
    (the message then counts no images: the rest of the set was not run)."""
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach().float().numpy()
    a = np.asarray(outputs)
    if not len(a):
        return
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if np.any(bad):
        at = first + int(np.argmax(bad))
        which = names[at] if names is not None and at < len(names) else f"image {at + 1}"
        counted = total is None or (first == 0 and total == len(a))
        raise NonFiniteOutputError(label, which, int(np.sum(bad)) if counted else None, total or len(a))


def require_finite_on(label: object, module: torch.nn.Module, x: torch.Tensor, names: Sequence[str] | None = None,
                      batch: int = 8) -> None:
    """Run ``module`` on the images ``x`` (float (N, C, S, S), as it takes them) and refuse NaN or Inf in
    what it computes (:func:`require_finite_output`): a flow checks the images a transform is about to
    use (calibration, fitting) before the transform sees them."""
    with torch.no_grad():
        for i in range(0, len(x), batch):
            y = module(x[i:i + batch])
            require_finite_output(label, y, names, first=i, total=len(x))
