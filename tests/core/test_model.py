import numpy as np
import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.counts import count_macs, count_parameters
from tinybeauty_cli.core.errors import ArchitectureMismatchError, ConfigError
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig, config_from_state_dict
from tinybeauty_cli.core.quality import psnr_db

from tests.helpers import REAL_CKPT, REAL_FACE


def test_released_layout_has_85227_parameters_and_the_released_keys():
    model = TinyBeauty()
    assert count_parameters(model)[0] == 85_227
    keys = set(model.state_dict())
    assert "content_encoder.resblocks.model.1.model.1.conv.weight" in keys
    assert "res.model.0.model.0.conv.bias" in keys
    assert {"upconv1.norm.gamma", "upconv1.norm.beta", "upconv2.norm.gamma", "out.conv.weight"} <= keys
    assert len(keys) == 32


def test_macs_at_256_are_about_1_48_g():
    assert count_macs(TinyBeauty(), 256) == pytest.approx(1.48e9, rel=0.01)


def test_config_round_trips_through_dict_and_state_dict_shapes():
    cfg = TinyBeautyConfig(n_res=2, first=10, down1=12, stream=14, res_hidden=(5, 6, 7, 8), up1=9, up2=11)
    assert TinyBeautyConfig.from_dict(cfg.to_dict()) == cfg
    model = TinyBeauty(cfg)
    assert config_from_state_dict(model.state_dict()) == cfg
    out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)


def test_n_res_is_configurable():
    cfg = TinyBeautyConfig.uniform(16, 3)
    assert config_from_state_dict(TinyBeauty(cfg).state_dict()) == cfg


@pytest.mark.parametrize("bad", [dict(n_res=1, res_hidden=(4, 4, 4)), dict(first=0), dict(n_res=-1, res_hidden=())])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        TinyBeautyConfig(**bad)


def test_state_dict_without_tinybeauty_keys_is_a_mismatch():
    with pytest.raises(ArchitectureMismatchError):
        config_from_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_layernorm_is_munit_style_unbiased_std_over_chw():
    from tinybeauty_cli.core.model import LayerNorm

    ln = LayerNorm(4)
    with torch.no_grad():
        ln.gamma.fill_(1.0)
    x = torch.randn(2, 4, 5, 5) * 3 + 1
    y = ln(x)
    flat = x.reshape(2, -1)
    expected = (x - flat.mean(1).view(-1, 1, 1, 1)) / (flat.std(1, unbiased=True).view(-1, 1, 1, 1) + 1e-5)
    torch.testing.assert_close(y, expected)


@pytest.mark.realdata
def test_correctness_anchor_on_the_released_weights(realdata):
    """face_01.png -> 256 bicubic -> [-1, 1] -> released style-1 weights (fp32).

    Figures from an independent implementation: residual mean |r| 0.01707, per-channel
    means (-0.00936, -0.02006, -0.02150); the 8-bit output is 31.47 dB from the 8-bit input.
    """
    sd = torch.load(REAL_CKPT, map_location="cpu", weights_only=True)["cleaner"]
    model = TinyBeauty(config_from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    model.eval()
    img = np.asarray(Image.open(REAL_FACE).convert("RGB").resize((256, 256), Image.BICUBIC), np.uint8)
    x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        r = model(x)
    assert r.abs().mean().item() == pytest.approx(0.01707, abs=5e-5)
    np.testing.assert_allclose(r.mean(dim=(0, 2, 3)).numpy(), [-0.00936, -0.02006, -0.02150], atol=5e-5)
    out = torch.clamp(x + r, -1, 1)[0].permute(1, 2, 0).numpy()
    out8 = np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)
    assert float(psnr_db(out8, img)[0]) == pytest.approx(31.47, abs=0.01)
