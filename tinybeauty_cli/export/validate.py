"""Checking a written Core ML file against the module it was made from: it loads, its interface is
the one promised, every weight reads back, and the PyTorch twin carrying the file's decompressed
weights makes up faces like the float model (the Core ML runtime itself is macOS-only)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.artifact import Preprocessing
from ..core.errors import InputError
from ..core.images import synthetic_unlabeled, uint8_to_model
from ..core.quality import PSNR_CAP_DB, psnr_db
from ..core.sanity import require_finite_output
from ..coreml.spec import Feature, feature, load_spec
from ..coreml.weights import carry_file_weights, stored_weights
from .config import IMAGE_IN, IMAGE_OUT, TENSOR_IN, TENSOR_OUT, ExportConfig, ExportError, tensor_dtype
from .convert import ExportedModel


def interface(f: Feature) -> dict[str, Any]:
    """A declared input or output as ``tbopt export`` reports it."""
    if f.kind == "image":
        color = f.color if f.color in ("RGB", "BGR") else str(f.color).lower()
        return {"name": f.name, "type": "image", "color": color, "shape": [f.shape[2], f.shape[3]]}
    return {"name": f.name, "type": "multiarray", "dtype": f.dtype.replace("fp", "float"), "shape": list(f.shape)}


def expected_interface(config: ExportConfig, target: str, size: int, channels: int) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs an export promises."""
    if config.io == "image":
        return ([{"name": IMAGE_IN, "type": "image", "color": "RGB", "shape": [size, size]}],
                [{"name": IMAGE_OUT, "type": "image", "color": "RGB", "shape": [size, size]}])
    shape = [1, channels, size, size]
    dtype = tensor_dtype(config, target)
    return ([{"name": TENSOR_IN, "type": "multiarray", "dtype": dtype, "shape": shape}],
            [{"name": TENSOR_OUT, "type": "multiarray", "dtype": dtype, "shape": shape}])


#: How many images the written file is checked on, and their seed (synthetic portraits, not the test set's).
CHECK_IMAGES, CHECK_SEED = 2, 7


def check_images(size: int, prep: Preprocessing, count: int = CHECK_IMAGES) -> tuple[np.ndarray, list[str]]:
    """The images a written file is checked on, as the model takes them, and how messages name them."""
    images = synthetic_unlabeled(count, size, seed=CHECK_SEED)
    return uint8_to_model(images.inputs, prep.value_range), images.image_labels()


def fidelity(reference: nn.Module, candidate: nn.Module, size: int, prep: Preprocessing, count: int = CHECK_IMAGES,
             labels: tuple[str, str] = ("the float model", "the written file")) -> dict:
    """Made-up images of the float model vs the model with the file's weights (PyTorch, fp32); NaN or Inf
    in either is refused, naming the model (``labels``: the float model's, the file's) and the image."""
    x, names = check_images(size, prep, count)
    x = torch.from_numpy(x)
    lo, hi = prep.value_range
    with torch.no_grad():
        a, b = reference(x), candidate(x)
    require_finite_output(labels[0], a, names)
    require_finite_output(labels[1], b, names)
    if prep.output != "image":  # the made-up image, clamped to the model's own value range
        a, b = torch.clamp(x + a, lo, hi), torch.clamp(x + b, lo, hi)
    capped = np.minimum(psnr_db(a.numpy(), b.numpy(), data_range=hi - lo), PSNR_CAP_DB)
    return {"images": count, "fidelity_psnr_db": round(float(np.mean(capped)), 2),
            "worst_fidelity_db": round(float(np.min(capped)), 2)}


def executor_fidelity(path: Path, reference: nn.Module, size: int, prep: Preprocessing, count: int = CHECK_IMAGES,
                      labels: tuple[str, str] = ("the float model", "the written file")) -> dict:
    """Made-up images of the float model vs the file itself, run by tbopt's reference executor
    (what a file with int8 activations computes, which no PyTorch twin with its weights shows);
    image outputs compared before Core ML's 8-bit rounding."""
    from ..coreml.runner import open_coreml_runner  # noqa: PLC0415

    x, names = check_images(size, prep, count)
    lo, hi = prep.value_range
    runner = open_coreml_runner(path, use_device=False, round_image_output=False)
    with torch.no_grad():
        out = reference(torch.from_numpy(x)).numpy()
    require_finite_output(labels[0], out, names)
    residual = runner.residual(x)
    require_finite_output(labels[1], residual, names)
    a = out if prep.output == "image" else x + out
    b = x + residual
    a, b = np.clip(a, lo, hi), np.clip(b, lo, hi)
    capped = np.minimum(psnr_db(a, b, data_range=hi - lo), PSNR_CAP_DB)
    return {"images": count, "fidelity_psnr_db": round(float(np.mean(capped)), 2),
            "worst_fidelity_db": round(float(np.min(capped)), 2)}


def validate_export(path: Path, exported: ExportedModel, reference: nn.Module,
                    labels: tuple[str, str] = ("the float model", "the written file")) -> tuple[dict[str, Any],
                                                                                              list[dict], list[dict]]:
    """(validation figures, inputs, outputs) of the file at ``path`` written from ``exported``;
    ``reference`` is the float model it was made from. Raises :class:`ExportError` if it fails, and
    :class:`~..core.errors.NonFiniteOutputError` if either computes NaN or Inf (``labels`` name them)."""
    config, size, channels = exported.config, exported.size, exported.channels
    try:
        spec = load_spec(path)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the written file does not load as a Core ML model: {exc}") from exc
    inputs = [interface(feature(f, "input")) for f in spec.description.input]
    outputs = [interface(feature(f, "output")) for f in spec.description.output]
    want_in, want_out = expected_interface(config, exported.plan.target, size, channels)
    if inputs != want_in or outputs != want_out:
        raise ExportError(f"the written model's interface is {inputs} -> {outputs}, expected {want_in} -> {want_out}")
    try:
        weights = stored_weights(path)
    except InputError as exc:
        raise ExportError(f"the written ML Program does not read back: {exc}") from exc
    exact = copy.deepcopy(exported.module)
    match = carry_file_weights(exact, weights, torch.zeros(1, channels, size, size))
    if config.activations:  # int8 activations: only running the file shows what they cost
        fid = executor_fidelity(path, reference, size, exported.preprocessing, labels=labels)
        check = ("the file itself, int8 activations included, run by tbopt's reference executor vs the float "
                 "model (the Core ML runtime itself is macOS-only)")
    else:
        fid = fidelity(reference, exact.eval(), size, exported.preprocessing, labels=labels)
        check = ("PyTorch with the file's decompressed weights vs the float model "
                 "(the Core ML runtime itself is macOS-only)")
    worst = max(match.relative_error.items(), key=lambda kv: kv[1]) if match.relative_error else ("-", 0.0)
    validation = {
        "spec_loads": True,
        "interface": "as promised",
        "weights_decompressed": len(match.values),
        "weight_storage": dict(Counter(match.storage.values()).most_common()),
        "max_weight_error": round(worst[1], 5),
        "max_weight_error_tensor": worst[0],
        **fid,
        "numerical_check": check,
    }
    return validation, inputs, outputs
