"""The fixtures every test folder shares (the plain helpers are in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tinybeauty_cli.core.artifact import Artifact, HistoryStep, save_artifact

from tests.helpers import COREML_SIZE, REAL_CKPT, REAL_COREML_SIZE, REAL_FACE, REALDATA, photo_folder, small_tinybeauty

@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("TBOPT_DEBUG", raising=False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def realdata() -> Path:
    if not (REAL_CKPT.is_file() and REAL_FACE.is_file()):
        pytest.skip("../shared/realdata is absent")
    return REALDATA


@pytest.fixture
def small_artifact(tmp_path) -> Path:
    """A tiny TinyBeauty (width 8, 1+1 residual blocks) saved as a tbopt artifact."""
    model = small_tinybeauty()
    path = tmp_path / "small.pt"
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(),
                                          history=[HistoryStep.now("test-fixture")]), path)
    return path


@pytest.fixture
def small_state_dict_file(tmp_path) -> Path:
    model = small_tinybeauty()
    path = tmp_path / "small_sd.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of three random 64x64 photos (calibration or evaluation images)."""
    return photo_folder(tmp_path / "photos", 3, 64)


# ---------------------------------------------------------------- Core ML test models (built on first use)

@pytest.fixture(scope="session")
def inputs():
    """Three synthetic faces at COREML_SIZE, model space (on the 8-bit grid, as photos are)."""
    from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model

    return uint8_to_model(builtin_test_set(COREML_SIZE, limit=3).inputs)


@pytest.fixture(scope="session")
def tb_zoo(tmp_path_factory):
    """Core ML files of a small TinyBeauty, made with coremltools directly (see tests/coreml_models.py)."""
    from tests.coreml_models import CoreMLZoo

    return CoreMLZoo(tmp_path_factory.mktemp("coreml_tinybeauty"), small_tinybeauty(seed=3, dim=8, n_res=1),
                     COREML_SIZE)


@pytest.fixture(scope="session")
def real_zoo(tmp_path_factory):
    """Core ML files of the authors' released checkpoint, at REAL_COREML_SIZE."""
    if not REAL_CKPT.is_file():
        pytest.skip("../shared/realdata is absent")
    from tinybeauty_cli.core.checkpoint import load_model

    from tests.coreml_models import CoreMLZoo

    return CoreMLZoo(tmp_path_factory.mktemp("coreml_real"), load_model(REAL_CKPT).module.eval(), REAL_COREML_SIZE)


@pytest.fixture(scope="session")
def real_inputs():
    """The real face and one synthetic face at REAL_COREML_SIZE, model space."""
    if not REAL_FACE.is_file():
        pytest.skip("../shared/realdata is absent")
    import numpy as np
    from PIL import Image

    from tinybeauty_cli.core.images import builtin_test_set, to_model_size, uint8_to_model

    face = to_model_size(Image.open(REAL_FACE).convert("RGB"), REAL_COREML_SIZE)[None]
    return uint8_to_model(np.concatenate([face, builtin_test_set(REAL_COREML_SIZE, limit=1).inputs]))
