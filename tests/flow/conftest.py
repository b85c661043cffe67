"""What the tests of tbopt optimize share: a tiny model with pairs and photos to search on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.images import builtin_test_set, model_to_uint8
from tinybeauty_cli.measure.evaluate import evaluate
from tinybeauty_cli.runtime.runners import runner_for

from tests.helpers import save_small

SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny TinyBeauty at 32x32, four pairs (input/ + target/) and the same four inputs alone.

    The targets are the tiny model's own made-up images with a little noise: what it was trained
    to make, so that any change of its weights costs PSNR, as on a trained model."""
    d = tmp_path_factory.mktemp("optimize")
    ckpt = save_small(d / "tiny.pt", size=SIZE)
    images = builtin_test_set(SIZE, 4)
    made_up = evaluate(runner_for(load_model(ckpt)), images).outputs
    noise = np.random.default_rng(0).normal(0.0, 2.0 / 127.5, made_up.shape)
    targets = model_to_uint8(np.clip(made_up + noise, -1, 1))
    for sub, arrays in (("pairs/input", images.inputs), ("pairs/target", targets), ("faces", images.inputs)):
        (d / sub).mkdir(parents=True)
        for name, a in zip(images.names, arrays):
            Image.fromarray(a).save(d / sub / f"{name}.png")
    return d, ckpt
