from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tinybeauty_cli.checkpoint import Artifact, HistoryStep, save_artifact
from tinybeauty_cli.model import TinyBeauty, TinyBeautyConfig

# A git worktree sits one level deeper than the main checkout: TBOPT_REALDATA points there.
REALDATA = Path(os.environ.get("TBOPT_REALDATA") or Path(__file__).resolve().parent.parent.parent / "shared" / "realdata")
REAL_CKPT = REALDATA / "tinybeauty_style1.pt"
REAL_FACE = REALDATA / "face_01.png"


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


def small_tinybeauty(seed: int = 0, dim: int = 8, n_res: int = 1) -> TinyBeauty:
    torch.manual_seed(seed)
    model = TinyBeauty(TinyBeautyConfig.uniform(dim, n_res)).eval()
    with torch.no_grad():  # small residuals, like a trained model's
        model.out.conv.weight.mul_(0.1)
    return model


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
