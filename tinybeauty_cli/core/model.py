"""TinyBeauty, exactly as released with the paper, with configurable widths.

Module names match the authors' ``BeautyREC`` so that their checkpoints load with
``strict=True``. Every channel group that channel pruning can shrink has its own
width in :class:`TinyBeautyConfig`, and :func:`config_from_state_dict` recovers
that configuration from tensor shapes alone, so a pruned model rebuilds from its
state dict with no pickled code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ArchitectureMismatchError, ConfigError


class LayerNorm(nn.Module):
    """MUNIT-style layer norm: per sample, mean and unbiased std over (C, H, W).

    ``(x - mean) / (std + eps)`` then per-channel ``gamma``/``beta``. This is not
    ``nn.LayerNorm`` (which divides by ``sqrt(var + eps)`` and has per-element
    affine parameters).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.gamma = nn.Parameter(torch.rand(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1)
        x = (x - mean) / (std + self.eps)
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


class Conv2dBlock(nn.Module):
    """Reflection pad -> Conv2d (with bias) -> optional norm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        norm: str = "none",
        activation: str = "relu",
    ):
        super().__init__()
        self.pad = nn.ReflectionPad2d(padding)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, bias=True)
        if norm == "in":
            self.norm: nn.Module | None = nn.InstanceNorm2d(out_channels)
        elif norm == "ln":
            self.norm = LayerNorm(out_channels)
        elif norm == "none":
            self.norm = None
        else:  # pragma: no cover - internal misuse
            raise ValueError(f"unknown norm {norm!r}")
        if activation == "relu":
            self.activation: nn.Module | None = nn.ReLU(inplace=True)
        elif activation == "tanh":
            self.activation = nn.Tanh()
        elif activation == "none":
            self.activation = None
        else:  # pragma: no cover - internal misuse
            raise ValueError(f"unknown activation {activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pad(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class ResBlock(nn.Module):
    """``x + B2(B1(x))``; ``hidden`` is B1's output width, B2 returns to ``dim``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(
            Conv2dBlock(dim, hidden, 3, 1, 1, norm="in", activation="relu"),
            Conv2dBlock(hidden, dim, 3, 1, 1, norm="in", activation="none"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.model(x)


class ResBlocks(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.model = nn.Sequential(*[ResBlock(dim, h) for h in hidden])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass(frozen=True)
class TinyBeautyConfig:
    """Channel widths of every independently prunable group.

    ``stream`` is the residual stream shared by ``down2``'s output, the outputs of
    every residual block and the skip into ``upconv1``; ``down1`` also feeds the
    skip into ``upconv2``. ``res_hidden`` lists the inner width of each residual
    block, the content encoder's blocks first, then the decoder's (``res``).
    """

    n_res: int = 2
    first: int = 24
    down1: int = 24
    stream: int = 24
    res_hidden: tuple[int, ...] = (24, 24, 24, 24)
    up1: int = 24
    up2: int = 24
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "res_hidden", tuple(int(h) for h in self.res_hidden))
        if self.n_res < 0:
            raise ConfigError(f"n_res must be >= 0, got {self.n_res}")
        if len(self.res_hidden) != 2 * self.n_res:
            raise ConfigError(
                f"res_hidden needs {2 * self.n_res} widths for n_res={self.n_res}, "
                f"got {len(self.res_hidden)}"
            )
        widths = [self.first, self.down1, self.stream, self.up1, self.up2, *self.res_hidden]
        if any(w < 1 for w in widths) or self.in_channels < 1 or self.out_channels < 1:
            raise ConfigError(f"every channel width must be >= 1, got {self.to_dict()}")

    @classmethod
    def uniform(cls, dim: int = 24, n_res: int = 2) -> "TinyBeautyConfig":
        return cls(n_res=n_res, first=dim, down1=dim, stream=dim,
                   res_hidden=(dim,) * (2 * n_res), up1=dim, up2=dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["res_hidden"] = list(self.res_hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TinyBeautyConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown TinyBeauty config keys: {sorted(unknown)}")
        try:
            return cls(**{k: (tuple(v) if k == "res_hidden" else int(v)) for k, v in d.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid TinyBeauty config {dict(d)}: {exc}") from exc

    @property
    def is_uniform(self) -> bool:
        return self == TinyBeautyConfig.uniform(self.first, self.n_res)


class ContentEncoder(nn.Module):
    def __init__(self, cfg: TinyBeautyConfig):
        super().__init__()
        self.conv_first = Conv2dBlock(cfg.in_channels, cfg.first, 7, 1, 3, norm="in")
        self.down1 = Conv2dBlock(cfg.first, cfg.down1, 4, 2, 1, norm="in")
        self.down2 = Conv2dBlock(cfg.down1, cfg.stream, 4, 2, 1, norm="in")
        self.resblocks = ResBlocks(cfg.stream, cfg.res_hidden[: cfg.n_res])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv_first(x)
        c1 = self.down1(x)
        c2 = self.down2(c1)
        return c1, c2, self.resblocks(c2)


class TinyBeauty(nn.Module):
    """The released TinyBeauty (``BeautyREC`` in the authors' code).

    Input: RGB in [-1, 1], spatial size divisible by 4. Output: a residual in
    (-1, 1); the made-up face is ``clamp(x + residual, -1, 1)``.
    """

    def __init__(self, config: TinyBeautyConfig | None = None):
        super().__init__()
        cfg = config or TinyBeautyConfig()
        self.config = cfg
        self.content_encoder = ContentEncoder(cfg)
        self.res = ResBlocks(cfg.stream, cfg.res_hidden[cfg.n_res:])
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.upconv1 = Conv2dBlock(cfg.stream * 2, cfg.up1, 3, 1, 1, norm="ln")
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.upconv2 = Conv2dBlock(cfg.down1 + cfg.up1, cfg.up2, 3, 1, 1, norm="ln")
        self.out = Conv2dBlock(cfg.up2, cfg.out_channels, 3, 1, 1, norm="none", activation="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.content_encoder(x)
        r = self.res(c3)
        u1 = self.upconv1(self.up1(torch.cat([c2, r], dim=1)))
        u2 = self.upconv2(self.up2(torch.cat([c1, u1], dim=1)))
        return self.out(u2)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ArchitectureMismatchError(
            f"not a TinyBeauty state dict: key {key!r} is missing",
            missing=[key],
        )
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> TinyBeautyConfig:
    """Recover a :class:`TinyBeautyConfig` from a state dict's tensor shapes alone."""
    first_w = _shape(sd, "content_encoder.conv_first.conv.weight")
    down1_w = _shape(sd, "content_encoder.down1.conv.weight")
    down2_w = _shape(sd, "content_encoder.down2.conv.weight")
    up1_w = _shape(sd, "upconv1.conv.weight")
    up2_w = _shape(sd, "upconv2.conv.weight")
    out_w = _shape(sd, "out.conv.weight")

    def hidden_widths(prefix: str) -> list[int]:
        widths = []
        i = 0
        while f"{prefix}.model.{i}.model.0.conv.weight" in sd:
            widths.append(int(sd[f"{prefix}.model.{i}.model.0.conv.weight"].shape[0]))
            i += 1
        return widths

    enc = hidden_widths("content_encoder.resblocks")
    dec = hidden_widths("res")
    if len(enc) != len(dec):
        raise ArchitectureMismatchError(
            f"not a TinyBeauty state dict: {len(enc)} encoder residual blocks but "
            f"{len(dec)} decoder residual blocks (TinyBeauty has the same number in both)"
        )
    try:
        return TinyBeautyConfig(
            n_res=len(enc),
            first=first_w[0],
            down1=down1_w[0],
            stream=down2_w[0],
            res_hidden=tuple(enc + dec),
            up1=up1_w[0],
            up2=up2_w[0],
            in_channels=first_w[1],
            out_channels=out_w[0],
        )
    except ConfigError as exc:
        raise ArchitectureMismatchError(f"not a TinyBeauty state dict: {exc}") from exc


def looks_like_tinybeauty(sd: Mapping[str, Any]) -> bool:
    return "content_encoder.conv_first.conv.weight" in sd and "upconv1.conv.weight" in sd
