"""Image-quality metrics beyond PSNR (which lives with the made-up image in ``core.quality``): SSIM."""

from __future__ import annotations

import numpy as np
import torch

_C1, _C2 = 0.01, 0.03  # SSIM's stabilising constants, as fractions of the data range (Wang et al. 2004)


def _as_nchw(a: np.ndarray) -> torch.Tensor:
    """float32 (N, C, H, W) from (N, H, W, 3), (N, 3, H, W) or one image: channels are the axis of
    size 3 next to the batch axis or at the end. From channels-last input the result keeps its
    channels-last strides, the layout PyTorch's depthwise convolution is fastest on."""
    t = torch.as_tensor(np.asarray(a, np.float32))
    if t.ndim == 3:
        t = t[None]
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    return t


class SsimReference:
    """SSIM against one fixed image batch (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, on
    each channel, averaged).

    A bench scores several models against the same reference: the reference's filtered maps (its
    local mean, its centred local mean and variance) are computed once here, so each model costs four
    filterings instead of seven. Arithmetic is in place where a result is not needed again: fresh
    tensors of a 100-image batch cost more in page faults than the arithmetic itself.
    """

    def __init__(self, b: np.ndarray, data_range: float = 255.0):
        tb = _as_nchw(b)
        self.shape = tuple(tb.shape)
        c = tb.shape[1]
        g = torch.exp(-0.5 * ((torch.arange(11, dtype=torch.float64) - 5) / 1.5) ** 2)
        g = (g / g.sum()).float()
        # The 2-D Gaussian window is the outer product of two 1-D ones: filtering by rows, then by
        # columns, gives the same sums with 22 instead of 121 multiplications per pixel.
        self._rows = g.view(1, 1, 11, 1).expand(c, 1, 11, 1).contiguous()
        self._cols = g.view(1, 1, 1, 11).expand(c, 1, 1, 11).contiguous()
        self._c1, self._c2 = (_C1 * data_range) ** 2, (_C2 * data_range) ** 2
        self._mu = self._filt(tb)
        # (Co)variances do not change with a shift: computing them from data centred on each image's
        # mean keeps E[x^2] - E[x]^2 free of float32 cancellation (within 1e-6 of a float64 SSIM).
        self._centred = tb - tb.mean(dim=(2, 3), keepdim=True)
        self._mc = self._filt(self._centred)
        self._var = self._filt(self._centred * self._centred).sub_(self._mc * self._mc)

    def _filt(self, t: torch.Tensor) -> torch.Tensor:
        c = t.shape[1]
        conv = torch.nn.functional.conv2d
        return conv(conv(t, self._rows, groups=c), self._cols, groups=c)

    def score(self, a: np.ndarray) -> np.ndarray:
        """SSIM of each image of ``a`` against the reference (same layout rules, same shape)."""
        ta = _as_nchw(a)
        if tuple(ta.shape) != self.shape:
            raise ValueError(f"shape mismatch {tuple(ta.shape)} vs {self.shape}")
        mu_a = self._filt(ta)
        ca = ta - ta.mean(dim=(2, 3), keepdim=True)
        del ta
        mca = self._filt(ca)
        tmp = ca * self._centred
        sab = self._filt(tmp).sub_(mca * self._mc)  # covariance
        torch.mul(ca, ca, out=tmp)
        del ca
        saa = self._filt(tmp).sub_(mca.square_())  # variance of a
        del tmp, mca
        # ((2 mu_a mu_b + c1)(2 sab + c2)) / ((mu_a^2 + mu_b^2 + c1)(saa + sbb + c2))
        num = sab.mul_(2).add_(self._c2).mul_(torch.mul(mu_a, self._mu).mul_(2).add_(self._c1))
        den = saa.add_(self._var).add_(self._c2).mul_(mu_a.square_().add_(self._mu * self._mu).add_(self._c1))
        return num.div_(den).double().mean(dim=(1, 2, 3)).numpy()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM per image of ``a`` against ``b``: (N, H, W, 3) or (N, 3, H, W) (see :class:`SsimReference`)."""
    return SsimReference(b, data_range).score(a)
