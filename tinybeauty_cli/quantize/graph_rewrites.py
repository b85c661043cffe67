"""Exact rewrites of a float network's graph that make its CPU int8 version fast.

Plain FX int8 of TinyBeauty was slower than fp32: the convolutions are
a small part of the time; the norms, nearest upsampling and padding at 256x256 are the
rest. These rewrites change how the network is computed, not what it computes (each is
exact up to float rounding, and :func:`optimize_graph` checks that on real inputs):

* ``InstanceNorm2d`` without running statistics -> ``group_norm`` with one group per
  channel: the same formula, but ATen's group-norm kernel is vectorised for
  channels-last tensors (about 5-10x faster than ``instance_norm`` here).
* The MUNIT-style ``LayerNorm`` (mean and unbiased std over C, H, W) -> statistics from
  one ``native_group_norm`` call and a single per-channel multiply-add, instead of a
  slow ``std`` reduction and four broadcasting passes.
* nearest x2 upsample -> pad 1 -> 3x3 conv -> the same convolution at low resolution
  ("sub-pixel" form): each of the four output phases only sees a 2x2 neighbourhood of
  the low-resolution input, so the conv becomes a 2x2 conv with four times the output
  channels, followed by interleaving the phases. 4/9 of the multiply-adds, and the
  4x larger upsampled tensor is never built. Reflection padding of the upsampled
  tensor equals replication padding of the low-resolution one.
* with calibration images: each conv's output channels scaled and shifted to a common
  range where that is free (:func:`equalize_channel_ranges`), so that the int8 conv's
  per-tensor output requantization serves every channel alike.

The rewritten network is an ``fx.GraphModule`` whose quantizable layers are ordinary
``nn.Conv2d`` modules, so FX quantization sees them as usual. (No ``from __future__ import
annotations`` here: TorchScript reads the modules' class-level annotations.)
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.errors import UnusableModelError
from ..core.model import LayerNorm as MunitLayerNorm
from ..core.quality import psnr_db
from .fx_passes import FloatBoundary, SigmoidTanh

#: Fidelity (dB, residual outputs, peak-to-peak 2) a rewrite must keep to count as exact.
EXACT_PSNR_DB = 100.0


class ChannelInstanceNorm(nn.Module):
    """``InstanceNorm2d`` (no running statistics) computed as ``group_norm`` with C groups."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]

    def __init__(self, eps: float, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.eps = float(eps)
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_instance_norm(cls, norm: nn.InstanceNorm2d) -> "ChannelInstanceNorm":
        return cls(norm.eps, norm.weight if norm.affine else None, norm.bias if norm.affine else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.group_norm, not F.group_norm: the functional form first checks the batch size in
        # about fifteen scalar ops, which TorchScript runs one by one on every call (part of the
        # fixed cost per layer that does not shrink with the channels).
        return torch.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


class FastLayerNorm(nn.Module):
    """The MUNIT ``LayerNorm`` of :mod:`tinybeauty_cli.model`, computed in two passes.

    ``(x - mean) / (std + eps) * gamma + beta`` with the unbiased std over (C, H, W)
    equals ``x * scale + shift`` with per-sample, per-channel ``scale``/``shift``.
    ``native_group_norm`` with one group returns the mean and ``1/sqrt(biased var)``.
    """

    def __init__(self, norm: MunitLayerNorm):
        super().__init__()
        self.eps = float(norm.eps)
        self.gamma = nn.Parameter(norm.gamma.detach().clone().view(1, -1, 1, 1))
        self.beta = nn.Parameter(norm.beta.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        count = c * h * w
        _, mean, rstd = torch.native_group_norm(x, None, None, n, c, h * w, 1, 0.0)
        # unbiased std = sqrt(count / (count - 1)) * biased std; 1/rstd is the biased std
        std = math.sqrt(count / max(count - 1, 1)) / rstd.view(n, 1, 1, 1)
        scale = self.gamma / (std + self.eps)
        return torch.addcmul(self.beta - mean.view(n, 1, 1, 1) * scale, x, scale)


class PixelInterleave(nn.Module):
    """(N, 4*C, H+1, W+1) phase maps -> (N, C, 2H, 2W), written channels-last.

    Phase ``(di, dj)`` (channel block ``2*di + dj``) is read at offset ``(di, dj)`` and
    becomes output pixel ``(2i + di, 2j + dj)``. With ``scale``/``shift`` (per output
    channel) each value is mapped ``v * scale + shift`` on the way: this undoes the
    per-channel range equalization of the conv before it (see :func:`equalize_channel_ranges`)
    at no extra cost, since the interleave copies every value anyway.
    """

    scale: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.scale = None
        self.shift = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = self.channels
        n, h, w = y.shape[0], y.shape[2] - 1, y.shape[3] - 1
        # N, H+1, W+1, 4, C: a view when y is channels-last
        phases = y.permute(0, 2, 3, 1).unflatten(3, (4, c))
        out = torch.empty((n, h, 2, w, 2, c), dtype=y.dtype, device=y.device)
        scale, shift = self.scale, self.shift
        # A loop over a list, not two unrolled range loops with index arithmetic: TorchScript's freeze
        # folds such constant arithmetic in an order that changes with the process's hash seed, and
        # the saved file would then differ from run to run for the same model.
        for di, dj, k in [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]:
            src = phases[:, di:di + h, dj:dj + w, k]
            if scale is not None and shift is not None:
                torch.addcmul(shift, src, scale, out=out[:, :, di, :, dj, :])
            else:
                out[:, :, di, :, dj, :] = src
        return out.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class SubPixelConv2d(nn.Module):
    """nearest x2 upsample -> pad 1 -> 3x3 conv (stride 1), computed at low resolution.

    ``conv`` is a 2x2 convolution with four output blocks, one per output phase; for
    rows, phase 0 combines the 3x3 kernel's rows as ``[w0, w1 + w2]`` and phase 1 as
    ``[w0 + w1, w2]`` (the same for columns).
    """

    def __init__(self, conv: nn.Conv2d, pad_mode: str):
        super().__init__()
        if pad_mode not in ("replicate", "constant"):
            raise ValueError(f"pad_mode must be 'replicate' or 'constant', got {pad_mode!r}")
        w = conv.weight.detach()
        out_ch, in_ch = w.shape[:2]

        def phases_along(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
            w0, w1, w2 = t.unbind(dim)
            return [torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)]

        blocks = [both for rows in phases_along(w, 2) for both in phases_along(rows, 3)]
        self.pad_mode = pad_mode
        self.conv = nn.Conv2d(in_ch, 4 * out_ch, 2, bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat(blocks, 0))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach().repeat(4))
        self.interleave = PixelInterleave(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interleave(self.conv(F.pad(x, (1, 1, 1, 1), mode=self.pad_mode)))


#: Modules FX must not trace into: replaced as a whole, or (PixelInterleave) not traceable.
LEAF_MODULES: tuple[type[nn.Module], ...] = (MunitLayerNorm, ChannelInstanceNorm, FastLayerNorm, PixelInterleave,
                                             FloatBoundary, SigmoidTanh)
#: Layers int8 quantization can replace.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                  nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


class TraceError(Exception):
    """The network cannot be traced into a static graph (data-dependent control flow, ...)."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic FX trace, with tbopt's norms kept as single nodes."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure has the same meaning for the caller
        raise TraceError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    for node in graph.nodes:
        # String annotations (``from __future__ import annotations``) would reach TorchScript
        # as unknown type names; every value here is a Tensor anyway.
        node.type = None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


@dataclass
class RewriteReport:
    """What :func:`optimize_graph` changed, and how close the result is to the original."""

    applied: list[str] = field(default_factory=list)
    subpixel_layers: dict[str, str] = field(default_factory=dict)  # original conv name -> its 2x2 conv
    equalized: dict[str, float] = field(default_factory=dict)  # conv -> widest / narrowest channel range before
    fidelity_db: float | None = None
    skipped: str | None = None  # why the rewrites were not used

    def to_dict(self) -> dict[str, Any]:
        return {"applied": list(self.applied), "subpixel_layers": dict(self.subpixel_layers),
                "equalized_range_spread": {k: round(v, 1) for k, v in self.equalized.items()},
                "fidelity_db": None if self.fidelity_db is None else round(self.fidelity_db, 1),
                "skipped": self.skipped}


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_nearest_x2(gm: fx.GraphModule, node: fx.Node) -> bool:
    def ok(scale: Any, mode: Any, size: Any, align: Any = None) -> bool:
        return (mode == "nearest" and size is None and align is None
                and scale is not None and all(float(s) == 2.0 for s in _pair(scale)))

    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.Upsample) and ok(mod.scale_factor, mod.mode, mod.size, mod.align_corners)
    if node.op == "call_function" and node.target is F.interpolate:
        kw = dict(node.kwargs)
        names = ("input", "size", "scale_factor", "mode", "align_corners")
        kw.update({k: v for k, v in zip(names, node.args)})
        return ok(kw.get("scale_factor"), kw.get("mode", "nearest"), kw.get("size"), kw.get("align_corners"))
    return False


_PAD_MODULES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate", nn.ZeroPad2d: "zeros"}


def _pad_mode(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'reflect' | 'replicate' | 'zeros' for a pad of 1 on every side, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        mode = _PAD_MODULES.get(type(mod))
        if mode is None and isinstance(mod, nn.ConstantPad2d) and mod.value == 0:
            mode = "zeros"
        return mode if mode and tuple(mod.padding) == (1, 1, 1, 1) else None
    if node.op == "call_function" and node.target is F.pad:
        args = list(node.args) + [None] * 3
        pad = node.kwargs.get("pad", args[1])
        mode = node.kwargs.get("mode", args[2] or "constant")
        value = node.kwargs.get("value", args[3] or 0)
        if pad is None or tuple(pad) != (1, 1, 1, 1):
            return None
        if mode == "constant":
            return "zeros" if not value else None
        return mode if mode in ("reflect", "replicate") else None
    return None


def _users_of_target(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _rewrite_norms(gm: fx.GraphModule, report: RewriteReport) -> None:
    counts = {"in": 0, "ln": 0}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.InstanceNorm2d) and not mod.track_running_stats:
            _set_submodule(gm, node.target, ChannelInstanceNorm.from_instance_norm(mod))
            counts["in"] += 1
        elif isinstance(mod, MunitLayerNorm):
            _set_submodule(gm, node.target, FastLayerNorm(mod))
            counts["ln"] += 1
    if counts["in"]:
        report.applied.append(f"{counts['in']} InstanceNorm2d -> group_norm with one group per channel")
    if counts["ln"]:
        report.applied.append(f"{counts['ln']} MUNIT LayerNorm -> group-norm statistics + one multiply-add")


def _rewrite_tanh(gm: fx.GraphModule, report: RewriteReport) -> None:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Tanh:
            _set_submodule(gm, node.target, SigmoidTanh())
            count += 1
        elif node.op == "call_function" and node.target in (torch.tanh, F.tanh) and len(node.args) == 1 \
                and not node.kwargs:
            name = f"sigmoid_tanh_{count}"
            gm.add_submodule(name, SigmoidTanh())
            node.op, node.target = "call_module", name
            count += 1
    if count:
        report.applied.append(f"{count} tanh -> 2 * sigmoid(2x) - 1 (vectorised on CPU)")


def _rewrite_subpixel(gm: fx.GraphModule, report: RewriteReport) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(node.target)
        if not (type(conv) is nn.Conv2d and _pair(conv.kernel_size) == (3, 3) and _pair(conv.stride) == (1, 1)
                and _pair(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and _users_of_target(gm, node.target) == 1
                and len(node.args) == 1 and not node.kwargs):
            continue
        src = node.args[0]
        pad_node = None
        if _pair(conv.padding) == (1, 1):
            mode = "zeros"
        elif _pair(conv.padding) == (0, 0) and isinstance(src, fx.Node) and len(src.users) == 1:
            mode = _pad_mode(gm, src)
            pad_node, src = src, src.args[0]
        else:
            continue
        if mode is None or not isinstance(src, fx.Node) or len(src.users) != 1 or not _is_nearest_x2(gm, src):
            continue
        up_node = src
        low = up_node.args[0] if up_node.args else up_node.kwargs.get("input")
        # On the upsampled grid, reflection padding by 1 repeats the edge pixel: replication at low resolution.
        new = SubPixelConv2d(conv, "constant" if mode == "zeros" else "replicate")
        _set_submodule(gm, node.target, new)
        node.args = (low,)
        for dead in (pad_node, up_node):
            if dead is not None and not dead.users:
                gm.graph.erase_node(dead)
        report.subpixel_layers[node.target] = f"{node.target}.conv"
    if report.subpixel_layers:
        names = ", ".join(report.subpixel_layers)
        report.applied.append(f"nearest x2 upsample + pad + 3x3 conv -> 2x2 sub-pixel conv at low resolution ({names})")


def fidelity_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR between two outputs in [-1, 1] (peak-to-peak 2), over the whole batch as one image
    (inf where identical): a rewrite must be exact on every value, not on average per image."""
    def flat(t: torch.Tensor):
        return t.detach().double().reshape(1, -1).numpy()
    return float(psnr_db(flat(a), flat(b), data_range=2.0)[0])


def optimize_graph(model: nn.Module, example: torch.Tensor,
                   images: Optional[torch.Tensor] = None) -> tuple[fx.GraphModule, RewriteReport]:
    """The rewritten network, or the plainly traced one if a rewrite would change its outputs.

    With ``images`` (calibration images), conv output ranges are also equalized
    (:func:`equalize_channel_ranges`). ``model`` itself is never modified.
    """
    report = RewriteReport()
    gm = trace(model)
    with torch.no_grad():
        reference = model(example)
    rewritten = trace(copy.deepcopy(model))  # a trace shares its leaf modules with the model
    _rewrite_norms(rewritten, report)
    _rewrite_subpixel(rewritten, report)
    _rewrite_tanh(rewritten, report)
    rewritten.graph.eliminate_dead_code()
    rewritten.graph.lint()
    rewritten.delete_all_unused_submodules()
    rewritten.recompile()
    rewritten.eval()
    if images is not None:
        eq = equalize_channel_ranges(rewritten, images)
        if eq.layers:
            report.equalized = dict(eq.spread)
            report.applied.append(f"conv output channels scaled to equal ranges before int8 requantization "
                                  f"({len(eq.layers)} convs followed by an instance norm or a sub-pixel interleave)")
    if not report.applied:
        return gm, report
    with torch.no_grad():
        report.fidelity_db = fidelity_db(rewritten(example), reference)
    if report.fidelity_db < EXACT_PSNR_DB:
        report.skipped = (f"the rewritten graph differed from the original ({report.fidelity_db:.1f} dB < "
                          f"{EXACT_PSNR_DB:.0f} dB); quantizing the network as it is")
        report.applied, report.subpixel_layers, report.equalized = [], {}, {}
        return gm, report
    return rewritten, report


@dataclass
class Equalization:
    """Per-channel output ranges made equal before int8 requantization (see below)."""

    layers: list[str] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)  # widest / narrowest channel range, before

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "range_spread": {k: round(v, 1) for k, v in self.spread.items()}}


def _instance_norms() -> tuple[type[nn.Module], ...]:
    return (ChannelInstanceNorm, nn.InstanceNorm2d)


def _norm_after(gm: fx.GraphModule, conv_name: str) -> str:
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == conv_name)
    return next(iter(node.users)).target


def equalize_channel_ranges(gm: fx.GraphModule, images: torch.Tensor) -> Equalization:
    """Scale and shift each conv's output channels to a common range, where that is free.

    An int8 conv requantizes its output per tensor; when channel ranges differ by 10x or
    more, the narrow channels get a few levels only, and a norm then blows their error up
    (in TinyBeauty's last upsampling conv this was the largest error of the whole int8
    model). Scaling output channel c by ``a_c > 0`` and shifting it by ``b_c`` (weights and
    bias of the float conv) gives every channel the same range; it is free where the next
    step ignores it -- an instance norm (invariant to per-channel scale and shift) -- or
    can undo it on the way -- a :class:`SubPixelConv2d`'s interleave. The graph computes the
    same function afterwards.
    """
    targets: dict[str, tuple[nn.Conv2d, int, Optional[PixelInterleave]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, SubPixelConv2d):
            targets[node.target] = (mod.conv, 4, mod.interleave)
        elif (type(mod) is nn.Conv2d and len(node.users) == 1 and _users_of_target(gm, node.target) == 1
              and all(u.op == "call_module" and isinstance(gm.get_submodule(u.target), _instance_norms())
                      and not getattr(gm.get_submodule(u.target), "track_running_stats", False)
                      for u in node.users)):
            targets[node.target] = (mod, 1, None)
    if not targets:
        return Equalization()
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    var: dict[str, torch.Tensor] = {}  # smallest per-image variance of each channel

    def observe(name: str, phases: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            c = out.shape[1] // phases
            per = out.detach().transpose(0, 1).reshape(phases, c, out.shape[0], -1).transpose(0, 1)
            per = per.transpose(1, 2).reshape(c, out.shape[0], -1)  # channel, image, values
            mn, mx = per.amin((1, 2)), per.amax((1, 2))
            v = per.double().var(2, unbiased=False).amin(1)
            lo[name] = torch.minimum(lo[name], mn) if name in lo else mn
            hi[name] = torch.maximum(hi[name], mx) if name in hi else mx
            var[name] = torch.minimum(var[name], v) if name in var else v
        return hook

    hooks = [conv.register_forward_hook(observe(name, phases)) for name, (conv, phases, _) in targets.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(images), 4):
                gm(images[i:i + 4])
    finally:
        for h in hooks:
            h.remove()
    report = Equalization()
    for name, (conv, phases, interleave) in targets.items():
        width = (hi[name] - lo[name]).double()
        if not bool(torch.isfinite(width).all()):  # the caller checks its images first; a library caller may not
            raise UnusableModelError(f"the network computes NaN or Inf in {name} on the calibration images; "
                                     f"its weights cannot be right")
        if not bool((width > 0).any()):
            continue
        half = float(width.max()) / 2
        live = width > half * 1e-6
        a = torch.where(live, half / width.clamp_min(1e-30) * 2, torch.ones_like(width))
        if interleave is None:
            # An instance norm divides by sqrt(var + eps): scaling a channel by a moves eps to
            # eps / a^2 in the original units. Scale only where that changes the result by < 1e-6.
            eps = float(getattr(gm.get_submodule(_norm_after(gm, name)), "eps", 1e-5))
            change = eps * (1 - 1 / a**2).abs() / (2 * var[name].clamp_min(1e-30))
            a = torch.where(change < 1e-6, a, torch.ones_like(a))
        b = -a * (hi[name] + lo[name]).double() / 2
        report.spread[name] = float(width.max() / width[live].min())
        a_all, b_all = a.repeat(phases), b.repeat(phases)
        with torch.no_grad():
            conv.weight.mul_(a_all.view(-1, *[1] * (conv.weight.dim() - 1)).to(conv.weight.dtype))
            bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
            new_bias = (bias.double() * a_all + b_all).to(conv.weight.dtype)
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
        if interleave is not None:  # undo it while interleaving: y = (y' - b) / a
            interleave.scale = (1.0 / a).float()
            interleave.shift = (-b / a).float()
        report.layers.append(name)
    return report


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers int8 quantization can replace, in module order."""
    return [name for name, mod in model.named_modules() if name and isinstance(mod, QUANTIZABLE_TYPES)]


__all__ = ["ChannelInstanceNorm", "FastLayerNorm", "PixelInterleave", "SubPixelConv2d", "LEAF_MODULES",
           "Equalization", "equalize_channel_ranges",
           "QUANTIZABLE_TYPES", "RewriteReport", "TraceError", "optimize_graph", "quantizable_layers", "trace",
           "fidelity_db"]
