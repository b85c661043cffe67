"""Users' own networks for tests of ``--arch`` (none of them TinyBeauty): each one image in, one out.

``ARCHS`` is the corpus that every command is tried on (tests/cli/test_user_architectures.py): a
ConvTranspose + BatchNorm U-Net, GroupNorm + PixelShuffle, depthwise-separable convs, a hardswish body
with a sigmoid head, and an odd one (bilinear Upsample, SiLU, residual adds, odd channel counts).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyUNet(nn.Module):
    """A small U-Net: BatchNorm2d, a strided conv down, ConvTranspose2d up, a skip by concatenation, tanh."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        m = self.mid(self.enc2(e1))
        d = self.dec(torch.cat([e1, self.up(m)], dim=1))
        return torch.tanh(self.head(d))


class ShuffleNet(nn.Module):
    """GroupNorm and sub-pixel upsampling: a strided conv down, PixelShuffle(2) up, a residual to the input."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * width),
                                  nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.PixelShuffle(2))
        self.head = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        u = self.up(self.down(s))
        return torch.clamp(x + 0.1 * self.head(u + s), -1, 1)


class DepthwiseNet(nn.Module):
    """Depthwise-separable convs (a 3x3 conv per channel, then a 1x1 across), ReLU6, a MobileNet-like body."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)

        def separable(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.BatchNorm2d(c_in),
                                 nn.ReLU6(), nn.Conv2d(c_in, c_out, 1), nn.ReLU6())

        self.block1 = separable(width, 2 * width)
        self.block2 = separable(2 * width, width)
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.block2(self.block1(self.stem(x)))))


class SigmoidHeadNet(nn.Module):
    """Hardswish activations and a sigmoid head, mapped back to [-1, 1] (an image model trained on [0, 1])."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Hardswish(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.Hardswish(),
                                  nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(self.body(x)) - 1


class OddNet(nn.Module):
    """Odd channel counts (width + 3), max-pool down, bilinear Upsample up, SiLU, residual adds, a 5x5 conv."""

    def __init__(self, width: int = 8):
        super().__init__()
        c = width + 3
        self.stem = nn.Sequential(nn.Conv2d(3, c, 5, padding=2), nn.SiLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.SiLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.fuse = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        p = self.pool(s)
        m = self.mid(p) + p
        f = torch.nn.functional.silu(self.fuse(self.up(m)) + s)
        return torch.tanh(self.head(f))


#: The corpus: every command is tried on each of these (name -> class).
ARCHS = {"unet": TinyUNet, "shuffle": ShuffleNet, "depthwise": DepthwiseNet, "sigmoid": SigmoidHeadNet,
         "odd": OddNet}


def make(name: str, seed: int = 0) -> nn.Module:
    """A corpus network with random weights scaled like a trained one's (BatchNorm statistics not the identity)."""
    torch.manual_seed(seed)
    model = ARCHS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class NoConv(nn.Module):
    """A network with no convolution at all (commands that need conv layers must refuse it)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
