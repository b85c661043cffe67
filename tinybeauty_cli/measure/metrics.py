"""Image-quality metrics beyond PSNR (which lives with the made-up image in ``core.quality``): SSIM."""

from __future__ import annotations

import numpy as np
import torch


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, on each
    channel, averaged). ``a``, ``b``: (N, H, W, 3) or (N, 3, H, W) -- channels are
    detected as the axis of size 3 next to the batch axis or at the end."""
    ta = torch.as_tensor(np.asarray(a, np.float32))
    tb = torch.as_tensor(np.asarray(b, np.float32))
    if ta.ndim == 3:
        ta, tb = ta[None], tb[None]
    if ta.shape[-1] == 3 and ta.shape[1] != 3:
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    c = ta.shape[1]
    g = torch.exp(-0.5 * ((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2)
    g = (g / g.sum()).float()
    # The 2-D Gaussian window is the outer product of two 1-D ones: filtering by rows, then by
    # columns, gives the same sums with 22 instead of 121 multiplications per pixel.
    rows = g.view(1, 1, 11, 1).expand(c, 1, 11, 1).contiguous()
    cols = g.view(1, 1, 1, 11).expand(c, 1, 1, 11).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, rows, groups=c), cols, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(ta), filt(tb)
    # (Co)variances do not change with a shift: computing them from data centred on each image's
    # mean keeps E[x^2] - E[x]^2 free of float32 cancellation (within 1e-6 of a float64 SSIM).
    ca = ta - ta.mean(dim=(2, 3), keepdim=True)
    cb = tb - tb.mean(dim=(2, 3), keepdim=True)
    mca, mcb = filt(ca), filt(cb)
    saa = filt(ca * ca) - mca**2
    sbb = filt(cb * cb) - mcb**2
    sab = filt(ca * cb) - mca * mcb
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return m.double().mean(dim=(1, 2, 3)).numpy()
