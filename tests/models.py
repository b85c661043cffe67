"""Checkpoints the tests build for a purpose: one that passes every check made when a model is opened
but computes NaN on faces.

Its weights are finite and its output on ``core.sanity.probe_input`` is finite; one residual
conv's weights are scaled so that its largest output on the probe image is a fraction of the
float32 maximum. On a face the same conv's output is larger (texture; the probe is a smooth
ramp), overflows to Inf, and the instance norm after it turns Inf into NaN. The fraction is
found here on the machine the test runs on, not assumed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from tinybeauty_cli.core.artifact import Artifact, HistoryStep, Preprocessing, save_artifact
from tinybeauty_cli.core.images import builtin_test_set, synthetic_unlabeled, uint8_to_model
from tinybeauty_cli.core.sanity import probe_input

from .helpers import small_tinybeauty

#: "nan" or "inf" standing where a number would (a table cell, after a label, before "dB"), not in a path.
NAN_FIGURE = re.compile(r"(?:^|[\s│|(,:=])[+-]?(?:nan|inf)(?=$|[\s│|),;%]|dB)", re.IGNORECASE | re.MULTILINE)

#: The conv scaled: the second of the content encoder's first residual block (an instance norm follows).
CONV = "content_encoder.resblocks.model.0.model.1.conv"
FLOAT_MAX = float(np.finfo(np.float32).max)


def _faces(size: int) -> np.ndarray:
    """What the commands run a model on: the built-in test set and synthetic portraits (calibration)."""
    return np.concatenate([uint8_to_model(builtin_test_set(size, limit=4).inputs),
                           uint8_to_model(synthetic_unlabeled(4, size).inputs)])


def nan_on_faces_module(size: int = 64, seed: int = 0) -> torch.nn.Module:
    """A small TinyBeauty, finite weights, finite on the probe image, NaN on every face drawn here."""
    probe = torch.from_numpy(probe_input(size))
    faces = torch.from_numpy(_faces(size))
    base = small_tinybeauty(seed=seed)
    seen: list[float] = []
    hook = dict(base.named_modules())[CONV].register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    with torch.no_grad():
        base(probe)
    hook.remove()
    for fraction in (0.7, 0.8, 0.6, 0.9, 0.5):
        model = small_tinybeauty(seed=seed)
        conv = dict(model.named_modules())[CONV]
        with torch.no_grad():
            conv.weight.mul_(fraction * FLOAT_MAX / seen[0])
            if not bool(torch.isfinite(conv.weight).all()) or not bool(torch.isfinite(model(probe)).all()):
                continue
            out = model(faces).reshape(len(faces), -1)
        if not bool(torch.isfinite(out).all(1).any()):  # NaN on every face
            return model
    raise AssertionError("no scaling of one conv is finite on the probe image and NaN on faces here")


def save_nan_on_faces(path: Path, size: int = 64) -> Path:
    """:func:`nan_on_faces_module` saved as a tbopt artifact working at ``size`` pixels."""
    model = nan_on_faces_module(size)
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), history=[HistoryStep.now("test")],
                                          preprocessing=Preprocessing(size=size)), path)
    return path
