"""The PyTorch module that is traced for Core ML: TinyBeauty's LayerNorm in the form Core ML
computes quickly, batch norms folded, and the image or tensor interface around the network.

:func:`coreml_ready_module` computes the same function as the model it copies; :class:`CoreMLIO`
adds what the Core ML model computes around the network (the made-up image for image I/O).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core.artifact import Preprocessing
from ..core.model import LayerNorm
from .config import ExportError


class CoreMLLayerNorm(nn.Module):
    """TinyBeauty's LayerNorm as Core ML computes it: two ops (three) instead of fourteen.

    The original divides by the unbiased standard deviation over (C, H, W) plus eps; here
    the Bessel factor is folded into ``gamma`` and eps sits inside the square root (a
    relative difference below 1e-5 of the output). ``flavour`` picks the normalization:
    ``layer_norm`` (ML Program) or ``instance_norm`` of the tensor reshaped to one channel
    (NeuralNetwork, whose layer_norm lowering materialises (C, H, W) gamma/beta tensors).
    coremltools turns the per-channel ``* gamma + beta`` into one ``batch_norm`` op (mean 0,
    variance 1, eps 1e-5: a further factor 1/sqrt(1 + 1e-5) on gamma, 5e-6 relative).
    """

    def __init__(self, norm: LayerNorm, shape: tuple[int, int, int], flavour: str):
        super().__init__()
        c, h, w = shape
        n = c * h * w
        bessel = ((n - 1) / n) ** 0.5
        self.shape = (int(c), int(h), int(w))
        self.flavour = flavour
        self.eps = float(norm.eps)
        self.weight = nn.Parameter(norm.gamma.detach().reshape(1, -1, 1, 1) * bessel)
        self.bias = nn.Parameter(norm.beta.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        if self.flavour == "layer_norm":
            y = F.layer_norm(x, (c, h, w), eps=self.eps)
        else:
            y = F.instance_norm(x.reshape(-1, 1, c * h, w), eps=self.eps).reshape(-1, c, h, w)
        return y * self.weight + self.bias


def _norm_shapes(model: nn.Module, size: int, channels: int) -> dict[str, tuple[int, int, int]]:
    """Input shape of every TinyBeauty LayerNorm at ``size`` (a shape-only pass on the meta device)."""
    if not any(isinstance(m, LayerNorm) for m in model.modules()):
        return {}
    shapes: dict[str, tuple[int, int, int]] = {}
    probe = copy.deepcopy(model).to("meta")
    for name, mod in probe.named_modules():
        if isinstance(mod, LayerNorm):
            mod.register_forward_hook(lambda m, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[1:])))
    try:
        with torch.no_grad():
            probe(torch.zeros(1, channels, size, size, device="meta"))
    except Exception as exc:  # noqa: BLE001 - e.g. a size the network cannot take
        raise ExportError(f"the model cannot run at {size}x{size}: {type(exc).__name__}: {exc}") from exc
    return shapes


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv with torch.fx (what Core ML would do anyway).

    Doing it here keeps every weight in the file a tensor of the PyTorch module, which
    the PyTorch twin of a written file relies on. Networks torch.fx cannot trace are left as they are.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse  # noqa: PLC0415

    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: Core ML fuses it itself
        return model


def coreml_ready_module(model: nn.Module, size: int, fmt: str, channels: int = 3) -> nn.Module:
    """A copy of ``model`` with Core ML-friendly norms and folded batch norms (same function)."""
    model = copy.deepcopy(model).eval()
    flavour = "layer_norm" if fmt == "mlprogram" else "instance_norm"
    for name, shape in _norm_shapes(model, size, channels).items():
        _replace_module(model, name, CoreMLLayerNorm(model.get_submodule(name), shape, flavour))
    return _fold_batch_norms(model).eval()


class CoreMLIO(nn.Module):
    """What the Core ML model computes around the network: image in/out or tensor in/residual out."""

    def __init__(self, net: nn.Module, io: str, preprocessing: Preprocessing):
        super().__init__()
        self.net = net
        self.io = io
        self.lo, self.hi = preprocessing.value_range
        self.returns_image = preprocessing.output == "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.io == "tensor":
            return y
        made_up = torch.clamp(y if self.returns_image else x + y, self.lo, self.hi)
        if (self.lo, self.hi) == (-1.0, 1.0):
            return (made_up + 1.0) * 127.5
        return (made_up - self.lo) * (255.0 / (self.hi - self.lo))


def _compressible(model: nn.Module) -> dict[str, torch.Tensor]:
    """Conv / linear weights: the tensors --weights and --sparse act on."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                            nn.ConvTranspose3d, nn.Linear)):
            out[f"{name}.weight"] = mod.weight.detach()
    return out


def tensor_zeros(model: nn.Module) -> list[tuple[int, int]]:
    """(zeros, size) of every conv/linear weight."""
    return [(int((w == 0).sum()), w.numel()) for w in _compressible(model).values()]
