"""Checking a written Core ML file against the module it was made from: its interface is the one
promised, every weight reads back, and the PyTorch twin carrying the file's decompressed weights
makes up faces like the float model (the Core ML runtime itself is macOS-only). ``flow/export.py``
reads the file (its spec, weights, and for int8 activations the file run by the reference
executor); this module only checks what was read."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.artifact import Preprocessing
from ..core.images import synthetic_unlabeled, uint8_to_model
from ..core.quality import PSNR_CAP_DB, psnr_db
from ..coreml.spec import Feature, feature
from ..coreml.weights import carry_file_weights
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


def check_images(size: int, prep: Preprocessing, count: int = 2) -> np.ndarray:
    """The synthetic faces a written file is checked on, in the model's value range."""
    return uint8_to_model(synthetic_unlabeled(count, size, seed=7).inputs, prep.value_range)


def made_up_fidelity(a: np.ndarray, b: np.ndarray, prep: Preprocessing) -> dict:
    """PSNR of two sets of made-up images (clipped to the model's value range), mean and worst."""
    lo, hi = prep.value_range
    capped = np.minimum(psnr_db(np.clip(a, lo, hi), np.clip(b, lo, hi), data_range=hi - lo), PSNR_CAP_DB)
    return {"images": len(a), "fidelity_psnr_db": round(float(np.mean(capped)), 2),
            "worst_fidelity_db": round(float(np.min(capped)), 2)}


def fidelity(reference: nn.Module, candidate: nn.Module, size: int, prep: Preprocessing, count: int = 2) -> dict:
    """Made-up images of the float model vs the model with the file's weights (PyTorch, fp32)."""
    x = check_images(size, prep, count)
    with torch.no_grad():
        a, b = reference(torch.from_numpy(x)).numpy(), candidate(torch.from_numpy(x)).numpy()
    if prep.output != "image":  # the made-up image
        a, b = x + a, x + b
    return made_up_fidelity(a, b, prep)


def validate_export(spec: Any, weights: list, exported: ExportedModel, reference: nn.Module,
                    executor_fid: dict | None = None) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """(validation figures, inputs, outputs) of a written file, from what ``flow/`` read of it: its
    ``spec`` and stored ``weights`` (:func:`..coreml.weights.stored_weights`); ``exported`` is what
    was written and ``reference`` the float model it was made from. With int8 activations only
    running the file shows what they cost: ``executor_fid`` is its fidelity, the file run by the
    reference executor against ``reference``. Raises :class:`ExportError` if it fails."""
    config, size, channels = exported.config, exported.size, exported.channels
    inputs = [interface(feature(f, "input")) for f in spec.description.input]
    outputs = [interface(feature(f, "output")) for f in spec.description.output]
    want_in, want_out = expected_interface(config, exported.plan.target, size, channels)
    if inputs != want_in or outputs != want_out:
        raise ExportError(f"the written model's interface is {inputs} -> {outputs}, expected {want_in} -> {want_out}")
    exact = copy.deepcopy(exported.module)
    match = carry_file_weights(exact, weights, torch.zeros(1, channels, size, size))
    if executor_fid is not None:
        fid = executor_fid
        check = ("the file itself, int8 activations included, run by tbopt's reference executor vs the float "
                 "model (the Core ML runtime itself is macOS-only)")
    elif match.rewritten:  # the converter folded ops into weights: the twin is another function
        fid = executor_fidelity(path, reference, size, exported.preprocessing)
        check = ("the file itself run by tbopt's reference executor vs the float model (the converter folded "
                 f"other operations into {', '.join(match.rewritten)}, so no PyTorch model with the file's "
                 "weights computes what it does; the Core ML runtime itself is macOS-only)")
    else:
        fid = fidelity(reference, exact.eval(), size, exported.preprocessing)
        check = ("PyTorch with the file's decompressed weights vs the float model "
                 "(the Core ML runtime itself is macOS-only)")
    changed = set(match.rewritten)  # not compression error: the converter's own rewrite, checked by running
    errors = {k: v for k, v in match.relative_error.items() if k not in changed}
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    validation = {
        "spec_loads": True,
        "interface": "as promised",
        "weights_decompressed": len(match.values),
        "weight_storage": dict(Counter(match.storage.values()).most_common()),
        "max_weight_error": round(worst[1], 5),
        "max_weight_error_tensor": worst[0],
        **({"rewritten_by_converter": match.rewritten} if match.rewritten else {}),
        **fid,
        "numerical_check": check,
    }
    return validation, inputs, outputs
