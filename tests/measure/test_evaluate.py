import numpy as np
import pytest

from tinybeauty_cli.core.images import ImageSet, builtin_test_set, uint8_to_model
from tinybeauty_cli.core.quality import fidelity_psnr_db
from tinybeauty_cli.core.runner import Runner
from tinybeauty_cli.measure.evaluate import evaluate, target_psnr_db
from tinybeauty_cli.runtime.runners import TorchRunner

from tests.helpers import small_tinybeauty


class Identity(Runner):
    engine = "identity"

    def residual(self, x):
        return np.zeros_like(x)


def test_identity_scores_the_do_nothing_baseline():
    images = builtin_test_set(64, limit=4)
    ev = evaluate(Identity(), images, reference=uint8_to_model(images.inputs))
    assert ev.target_psnr_db == pytest.approx(ev.do_nothing_psnr_db)
    assert ev.fidelity_psnr_db >= 100  # identical outputs hit the cap


def test_fidelity_is_measured_in_float_before_rounding():
    a = np.zeros((2, 3, 8, 8), np.float32)
    b = a + 1e-3  # far below half an 8-bit level
    assert fidelity_psnr_db(a, b) == pytest.approx(10 * np.log10(4 / 1e-6), rel=1e-4)
    # 0.0 is saved as level 128: one level off a target of 129
    assert target_psnr_db(a, np.full((2, 8, 8, 3), 129, np.uint8)) == pytest.approx(10 * np.log10(255**2), rel=1e-6)


def test_unpaired_images_have_no_target_score():
    images = ImageSet(["a"], np.zeros((1, 32, 32, 3), np.uint8), None, "test")
    ev = evaluate(TorchRunner(small_tinybeauty()), images)
    assert ev.target_psnr_db is None and ev.fidelity_psnr_db is None
    assert ev.outputs.shape == (1, 3, 32, 32)


def test_ssim_matches_the_plain_float64_definition():
    """The fast SSIM (separable window, float32 on centred data) equals the textbook 2-D float64 one."""
    import torch

    from tinybeauty_cli.measure.metrics import ssim

    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ta = torch.as_tensor(a, dtype=torch.float64).permute(0, 3, 1, 2)
    tb = torch.as_tensor(b, dtype=torch.float64).permute(0, 3, 1, 2)
    g = torch.exp(-0.5 * ((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2)
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()

    def f(t):
        return torch.nn.functional.conv2d(t, win, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = f(ta), f(tb)
    saa, sbb, sab = f(ta * ta) - ma ** 2, f(tb * tb) - mb ** 2, f(ta * tb) - ma * mb
    want = (((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (saa + sbb + c2))).mean(dim=(1, 2, 3))
    got = ssim(a, b)
    assert np.allclose(got, want.numpy(), atol=1e-5)
    assert got.max() < 0.99
    assert np.allclose(ssim(a, a), 1.0, atol=1e-6)
