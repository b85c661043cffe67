"""Pruning: unstructured magnitude pruning (per layer or global) and structured channel pruning.

Three ways to prune the convolutions of a float model (TinyBeauty, or a user's own
conv network given with ``--arch``):

* ``magnitude`` -- in every Conv2d / ConvTranspose2d, weights whose magnitude is at
  most the layer's ``rate``-quantile become 0. Zeros already present count toward
  the quantile, so pruning a pruned model again at the same rate removes nothing
  more. Biases and norm parameters are left alone.
* ``global`` -- the same rule with one quantile over all those layers together.
* ``channel`` -- whole channels are removed, so tensors really get smaller and the
  network faster. Coupled layers (the residual stream through every residual block,
  the concatenation skips, the custom LayerNorm's ``gamma``/``beta``) are found by
  torch-pruning's dependency graph (DepGraph) and pruned together; the network's
  input and output channels are kept. Channels are ranked by how much the layers
  reading them use them; after the cut, every conv is refitted by least squares to
  reproduce the original conv's output (layer by layer, on calibration images).

Unstructured zeros neither shrink a dense file nor make dense kernels faster: the
report says so and shows the zipped size, which is what does shrink.

Any of them can be followed by a short distillation (``finetune_steps``): the unpruned
model is the teacher, the loss is L1 between the two models' made-up images, on
unlabeled images (a folder, or synthetic portraits -- never the built-in test set).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import Artifact, ArchSpec, HistoryStep, LoadedModel, load_model, save_artifact
from ..core.errors import ConfigError, InputError, UnsupportedError, UsageError
from .config import CONFIG_VERSION, DEFAULT_CHANNEL_FINETUNE_STEPS, PruneConfig, PruneMethod
from ..measure.evaluate import Evaluation, evaluate
from ..core.files import check_output, size_on_disk, zipped_size
from ..core.images import ImageSet, builtin_test_set, load_folder, synthetic_unlabeled, uint8_to_model
from ..core.counts import count_macs, count_parameters
from ..runtime.contexts import torch_threads
from ..core.model import LayerNorm, TinyBeauty, config_from_state_dict
from ..core.counts import input_channels
from ..core.progress import Progress, SilentProgress
from ..runtime.runners import TorchRunner
from ..core.training import FitConfig, fit, made_up

#: Layers whose weights are pruned (the issue's definition of "conv layers").
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)
# --- which layers ------------------------------------------------------------------------------


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / ConvTranspose2d by module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def excluded_layers(layers: Iterable[str], patterns: Sequence[str]) -> set[str]:
    """Layer names matched by ``patterns`` (exact name, a parent module's name, or a glob).

    A pattern that matches no layer is an error: a typo must not silently prune
    the layer the user meant to keep.
    """
    names = list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        hit = {n for n in names if _matches(n, pattern)}
        if not hit:
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise ConfigError(f"--exclude {pattern!r} matches no conv layer",
                              hint=f"conv layers are: {shown}")
        chosen |= hit
    return chosen


def _require_conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = prunable_layers(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no Conv2d or ConvTranspose2d layer: nothing to prune")
    return layers


# --- unstructured magnitude pruning -----------------------------------------------------------


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of a 1-D tensor, linear interpolation (numpy's default), in float64."""
    return float(np.quantile(values.detach().double().numpy(), q))


@torch.no_grad()
def prune_magnitude(model: nn.Module, rate: float, *, global_threshold: bool = False,
                    exclude: Iterable[str] = ()) -> dict[str, float | None]:
    """Zero, in place, every conv weight with ``|w| <= threshold``; returns each layer's threshold.

    The threshold is the ``rate``-quantile of the layer's ``|w|`` (``global_threshold``:
    of all included layers' ``|w|`` together). Existing zeros count toward the
    quantile, so at the same rate an already-pruned layer loses nothing more. Rate 0
    prunes nothing (the rule would otherwise zero each layer's smallest weight).
    """
    layers = _require_conv_layers(model)
    skip = set(exclude)
    included = {n: m for n, m in layers.items() if n not in skip}
    thresholds: dict[str, float | None] = {n: None for n in layers}
    if rate <= 0 or not included:
        return thresholds
    if global_threshold:
        every = torch.cat([m.weight.detach().abs().flatten() for m in included.values()])
        shared = _quantile(every, rate)
        thresholds.update({n: shared for n in included})
    else:
        thresholds.update({n: _quantile(m.weight.detach().abs().flatten(), rate) for n, m in included.items()})
    for name, m in included.items():
        keep = m.weight.detach().abs().double() > thresholds[name]
        m.weight.mul_(keep.to(m.weight.dtype))
    return thresholds


# --- structured channel pruning ----------------------------------------------------------------


def _torch_pruning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp
    return tp


def _layer_norm_pruner():
    """torch-pruning rule for TinyBeauty's MUNIT-style LayerNorm: per-channel ``gamma``/``beta``.

    Its forward reshapes the whole (C, H, W) map to compute one mean and std, so
    DepGraph sees the channel coupling; it only needs to know how to cut the two
    parameter vectors. Input and output channels are the same channels.
    """
    tp = _torch_pruning()

    class LayerNormPruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (LayerNorm,)

        def prune_out_channels(self, layer: LayerNorm, idxs: Sequence[int]) -> LayerNorm:
            keep = sorted(set(range(layer.num_features)) - set(idxs))
            layer.gamma = self._prune_parameter_and_grad(layer.gamma, keep, 0)
            layer.beta = self._prune_parameter_and_grad(layer.beta, keep, 0)
            layer.num_features = len(keep)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: LayerNorm) -> int:
            return layer.num_features

        def get_in_channels(self, layer: LayerNorm) -> int:
            return layer.num_features

    return LayerNormPruner()


@dataclass
class ChannelGroup:
    """Channels that must be removed together: one index space shared by coupled layers."""

    layers: list[str]  # convs whose output channels are this group, in graph order
    consumers: list[str]  # convs reading these channels
    channels_before: int
    channels_after: int
    removed: list[int]
    importance: list[float]  # per channel, before pruning (higher = kept)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "consumers": self.consumers, "channels_before": self.channels_before,
                "channels_after": self.channels_after, "removed": self.removed,
                "importance": [round(v, 5) for v in self.importance]}


@torch.no_grad()
def input_channel_rms(model: nn.Module, images: torch.Tensor, batch_size: int = 4) -> dict[nn.Module, torch.Tensor]:
    """Root-mean-square of every input channel of every conv / linear layer over ``images``."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        channel_dim = 1 if x.ndim > 2 else x.ndim - 1
        sq = x.pow(2).transpose(0, channel_dim).reshape(x.shape[channel_dim], -1)
        sums[module] = sums.get(module, 0) + sq.sum(1)
        counts[module] = counts.get(module, 0) + sq.shape[1]

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                             nn.Linear))]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {m: (sums[m] / counts[m]).sqrt().float() for m in sums}


def _input_channel_weight_norms(layer: nn.Module) -> torch.Tensor:
    """L2 norm of the weights that read each input channel of a conv / linear layer."""
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
        norms = w.flatten(1).norm(dim=1)  # (in, out/groups, k, k)
    else:
        norms = w.transpose(0, 1).flatten(1).norm(dim=1)  # (out, in/groups, k, k)
        groups = getattr(layer, "groups", 1)
        if groups > 1:
            norms = norms.repeat(groups)
    return norms


def channel_importance(group: Any, rms: Mapping[nn.Module, torch.Tensor]) -> tuple[torch.Tensor, list[nn.Module]]:
    """Per-channel importance of a DepGraph group, from the layers that *consume* its channels.

    Why not the producing conv's filter magnitude (torch-pruning's default): every
    conv in TinyBeauty is followed by an InstanceNorm (or the LayerNorm), which
    rescales each channel to unit variance, so a filter's norm says nothing about
    how strongly its channel reaches the rest of the network. What does is how much
    each consumer actually uses it: for every consuming conv, the norm of the
    weights that read the channel times the channel's RMS activation on calibration
    images (the energy it feeds into that conv). Each consumer's scores are
    normalised to sum to 1, so every consumer gets one vote however its weights are
    scaled, then summed over consumers (a stream channel read by eight convs counts
    eight times).
    """
    tp = _torch_pruning()
    fn = tp.pruner.function
    consumer_fns = (fn.prune_conv_in_channels, fn.prune_linear_in_channels)
    n = len(group[0].idxs)
    score = torch.zeros(n, dtype=torch.float64)
    consumers: list[nn.Module] = []
    for i, (dep, idxs) in enumerate(group):
        if dep.pruning_fn not in consumer_fns:
            continue
        layer = dep.layer
        root_idxs = group[i].root_idxs
        if any(r is None for r in root_idxs):
            continue
        weight_norms = _input_channel_weight_norms(layer).double()
        activation = rms.get(layer)
        local = weight_norms[idxs] * (activation.double()[idxs] if activation is not None else 1.0)
        total = float(local.sum())
        if total > 0:
            score.scatter_add_(0, torch.tensor(root_idxs, dtype=torch.long), local / total)
        if layer not in consumers:
            consumers.append(layer)
    return score, consumers


class _Stop(Exception):
    """Ends a forward pass once the layer of interest has been seen."""


def _plain_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.dilation) == (1, 1)
            and isinstance(m.padding, tuple))


def _patches(conv: nn.Conv2d, x: torch.Tensor, pos: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The input patches (rows, C*kh*kw, in ``conv.weight.flatten(1)`` order) behind output pixels ``pos``."""
    ph, pw = conv.padding
    if ph or pw:
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = nn.functional.pad(x, (pw, pw, ph, ph), mode=mode)
    n, i, j = pos
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    rows = i[:, None, None] * sh + torch.arange(kh)[None, :, None]
    cols = j[:, None, None] * sw + torch.arange(kw)[None, None, :]
    p = x[n[:, None, None], :, rows, cols]  # (R, kh, kw, C)
    return p.permute(0, 3, 1, 2).reshape(len(n), -1)


def _positions(shape: torch.Size, count: int, seed: int) -> tuple[torch.Tensor, ...]:
    n, _, h, w = shape
    flat = torch.randint(0, n * h * w, (count,), generator=torch.Generator().manual_seed(seed))
    return flat // (h * w), (flat % (h * w)) // w, flat % w


@torch.no_grad()
def reconstruct_layers(pruned: nn.Module, original: nn.Module, images: torch.Tensor,
                       removed_outputs: Mapping[str, set[int]], *, batch_size: int = 4,
                       rows_per_batch: int = 4096, ridge: float = 1e-3) -> list[str]:
    """Refit every plain conv of ``pruned``, in execution order, to reproduce ``original``'s outputs.

    For each conv: its input as the pruned network now computes it (earlier layers
    already refitted), its target the original conv's output at the same pixels (kept
    output channels only), and a ridge-regularised least-squares fit of weights and
    bias, pulled toward the current weights. Pruning errors then stop compounding
    from layer to layer, which is most of what a channel cut costs before fine-tuning.
    Returns the names of the refitted layers.
    """
    names = [n for n, m in pruned.named_modules() if _plain_conv(m)]
    modules_p = dict(pruned.named_modules())
    modules_o = dict(original.named_modules())
    order: list[str] = []
    hooks = [modules_p[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
             for n in names]
    try:
        pruned.eval()(images[:1])
    finally:
        for h in hooks:
            h.remove()
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    targets: dict[str, list[torch.Tensor]] = {n: [] for n in order}

    def keep_target(name: str, b: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            pos = _positions(out.shape, rows_per_batch, seed=1000 * b + order.index(name))
            kept = [c for c in range(out.shape[1]) if c not in removed_outputs.get(name, set())]
            targets[name].append(out[pos[0], :, pos[1], pos[2]][:, kept].double())
        return hook

    for b, x in enumerate(batches):
        hooks = [modules_o[n].register_forward_hook(keep_target(n, b)) for n in order]
        try:
            original.eval()(x)
        finally:
            for h in hooks:
                h.remove()

    for name in order:
        conv = modules_p[name]
        gram = rhs = None
        for b, x in enumerate(batches):
            seen: dict[str, torch.Tensor] = {}

            def grab(module: nn.Module, args: tuple) -> None:
                seen["x"] = args[0]
                raise _Stop

            h = conv.register_forward_pre_hook(grab)
            try:
                pruned(x)
            except _Stop:
                pass
            finally:
                h.remove()
            out_shape = conv(seen["x"][:1]).shape
            pos = _positions(torch.Size((len(x), *out_shape[1:])), rows_per_batch, seed=1000 * b + order.index(name))
            a = _patches(conv, seen["x"], pos).double()
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
            t = targets[name][b]
            gram = a.T @ a if gram is None else gram + a.T @ a
            rhs = a.T @ t if rhs is None else rhs + a.T @ t
        w0 = conv.weight.detach().flatten(1).double()
        b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros(len(w0), dtype=torch.float64)
        x0 = torch.cat([w0, b0[:, None]], 1).T  # (D + 1, out)
        lam = ridge * float(gram.diagonal().mean())
        solution = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs + lam * x0)
        conv.weight.copy_(solution[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_(solution[-1].to(conv.bias.dtype))
    return order


def _sync_norm_widths(model: nn.Module, example: torch.Tensor) -> None:
    """Set ``num_features`` of parameter-free InstanceNorms to the width they now receive.

    DepGraph does not see an InstanceNorm whose output an in-place ReLU overwrites
    (TinyBeauty's), so it leaves that attribute stale; without affine parameters or
    running statistics nothing else about the layer depends on the width.
    """
    seen: dict[nn.Module, int] = {}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)
             and not m.affine and not m.track_running_stats]
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0].shape[1]))
               for m in norms]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(example)
    finally:
        for h in handles:
            h.remove()
    for m, width in seen.items():
        m.num_features = width


def _touches_output(group: Any) -> bool:
    """True if the group's channels reach the network's output (its width is the output's)."""
    for dep, _ in group:
        for node in (dep.source, dep.target):
            if not node.outputs:
                return True
    return False


def _removal_count(channels: int, rate: float) -> int:
    """Channels to remove from a group: it keeps ``floor((1 - rate) * channels)``, at least one.

    Rounding the kept width down (torch-pruning's convention) matters for speed, not
    just size: on this CPU PyTorch runs TinyBeauty with 17 channels per layer no
    faster than with 24, and with 16 about 2.7 times faster (measured, see README).
    """
    keep = max(1, int(math.floor(channels * (1.0 - rate) + 1e-9)))
    return channels - keep if rate > 0 else 0


def prune_channels(model: nn.Module, rate: float, calibration: torch.Tensor, *,
                   exclude: Iterable[str] = (), reconstruct: bool = True) -> list[ChannelGroup]:
    """Remove ``rate`` of the channels of every prunable group of ``model``, in place.

    Groups come from torch-pruning's DepGraph, so everything that shares channels is
    cut together. A group is left whole when one of its convs is excluded, or when it
    reaches the output (the network must still return its 3 channels); the input's
    channels have no producing layer and are never touched. Channels are ranked by
    :func:`channel_importance` on ``calibration`` images. With ``reconstruct``, every
    conv is then refitted so that, given what the pruned layers before it now produce,
    it reproduces the original conv's output on those images (:func:`reconstruct_layers`).
    """
    tp = _torch_pruning()
    layers = _require_conv_layers(model)
    names = {m: n for n, m in model.named_modules()}
    excluded_modules = [layers[n] for n in exclude]
    if rate <= 0:
        return []
    example = calibration[:1]
    original = copy.deepcopy(model).eval() if reconstruct else None
    with torch.no_grad():
        out_shape_before = tuple(model(example).shape)
    rms = input_channel_rms(model, calibration)
    with warnings.catch_warnings(), torch.enable_grad():  # DepGraph traces the autograd graph
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters and tracing
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners={LayerNorm: _layer_norm_pruner()})
        groups = list(graph.get_all_groups(ignored_layers=excluded_modules,
                                           root_module_types=list(PRUNABLE_TYPES)))
    plans = []
    producer_cuts: dict[str, set[int]] = {}
    for group in groups:
        if _touches_output(group):
            continue
        root = group[0].dep.target.module
        channels = len(group[0].idxs)
        k = _removal_count(channels, rate)
        if k <= 0:
            continue
        score, consumers = channel_importance(group, rms)
        if not consumers:
            continue  # nothing reads these channels through a weight: no way to rank them
        order = torch.argsort(score, stable=True)
        removed = sorted(int(i) for i in order[:k])
        producers = [names[dep.target.module] for dep, _ in group
                     if dep.pruning_fn == tp.pruner.function.prune_conv_out_channels]
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn == tp.pruner.function.prune_conv_out_channels:
                cut = {ix for ix, r in zip(idxs, group[i].root_idxs) if r in set(removed)}
                producer_cuts.setdefault(names[dep.layer], set()).update(cut)
        plans.append((root, removed, ChannelGroup(
            layers=list(dict.fromkeys(producers)), consumers=[names[c] for c in consumers],
            channels_before=channels, channels_after=channels - k, removed=removed,
            importance=[float(v) for v in score])))
    # Importance was measured on the intact model; indices of one group are unaffected
    # by pruning another (DepGraph groups are disjoint), so prune one after another.
    with torch.no_grad():
        for root, removed, _ in plans:
            group = graph.get_pruning_group(root, tp.pruner.function.prune_conv_out_channels, removed)
            if not graph.check_pruning_group(group):  # pragma: no cover - guarded by _removal_count
                raise UnsupportedError(f"torch-pruning refused to prune {names[root]}")
            group.prune()
        _sync_norm_widths(model, example)
        out_shape_after = tuple(model(example).shape)
    if out_shape_after != out_shape_before:
        raise UnsupportedError(
            f"channel pruning changed the network's output from {out_shape_before} to {out_shape_after}",
            hint="keep the layers that produce the output with --exclude")
    if reconstruct and plans:
        reconstruct_layers(model, original, calibration, producer_cuts)
    return [plan for _, _, plan in plans]


# --- distillation -------------------------------------------------------------------------------


def conv_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each conv weight is non-zero (fine-tuning keeps the zeros zero)."""
    return {n: (m.weight.detach() != 0) for n, m in prunable_layers(model).items()}


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: PruneConfig,
            *, progress: Progress | None = None) -> list[float]:
    """Fine-tune ``student`` to reproduce ``teacher``'s made-up images (L1), in place.

    Each step takes ``cfg.batch_size`` whole images from ``images`` (randomly flipped;
    the teacher sees exactly what the student sees). Whole images rather than crops:
    InstanceNorm and LayerNorm statistics of a crop differ from a whole face's, and
    at the same pixels per step, two whole images recovered more than eight 128x128
    crops (measured on the demo checkpoint). Conv weights that are zero stay zero.
    Deterministic for ``cfg.seed`` (and the number of threads).
    """
    progress = progress or SilentProgress()
    steps = cfg.steps
    if steps <= 0:
        return []
    teacher = teacher.eval()  # its outputs are computed under no_grad: it is never trained
    masks = conv_masks(student)
    layers = prunable_layers(student)

    def batch(step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        x = images[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).contiguous()
        with torch.no_grad():
            y = made_up(teacher, x)
        return x, y

    def keep_zeros(model: nn.Module) -> None:
        for name, m in layers.items():
            m.weight.mul_(masks[name])

    losses: list[float] = []
    with progress.task("fine-tuning (distillation)", total=steps) as advance:
        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            advance(1, loss=loss)

        fit(student, batch, FitConfig(steps=steps, lr=cfg.lr, warmup=min(50, steps // 5), seed=cfg.seed),
            after_step=keep_zeros, on_step=on_step)
    student.eval()
    return losses


# --- the whole step -----------------------------------------------------------------------------


@dataclass
class LayerReport:
    name: str
    kind: str
    shape_before: list[int]
    shape_after: list[int]
    weights_before: int
    weights_after: int
    nonzero_after: int
    excluded: bool = False
    threshold: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of the remaining weights that are zero."""
        return 1.0 - self.nonzero_after / self.weights_after if self.weights_after else 0.0

    @property
    def removed_fraction(self) -> float:
        """Fraction of the original weights that are gone or zero."""
        return 1.0 - self.nonzero_after / self.weights_before if self.weights_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = round(self.sparsity, 5)
        d["removed_fraction"] = round(self.removed_fraction, 5)
        return d


@dataclass
class ModelTotals:
    parameters: int
    nonzero_parameters: int
    macs: int
    size_bytes: int | None = None
    zipped_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneReport:
    """Everything ``tbopt prune`` prints (the same dict ``--json`` prints)."""

    input: str
    output: str | None
    architecture: str
    size: int  # model input size (px) at which MACs are counted
    config: PruneConfig
    layers: list[LayerReport]
    groups: list[ChannelGroup]
    before: ModelTotals
    after: ModelTotals
    quality: dict[str, Any]
    finetune: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        def r(a: int | None, b: int | None) -> float | None:
            return None if a is None or not b else round(a / b, 4)
        return {
            "parameters": r(self.after.parameters, self.before.parameters),
            "nonzero_parameters": r(self.after.nonzero_parameters, self.before.nonzero_parameters),
            "macs": r(self.after.macs, self.before.macs),
            "size_bytes": r(self.after.size_bytes, self.before.size_bytes),
            "zipped_bytes": r(self.after.zipped_bytes, self.before.zipped_bytes),
        }

    def figures(self) -> dict[str, Any]:
        """The short summary kept in the artifact's history."""
        return {
            "parameters": self.after.parameters,
            "nonzero_parameters": self.after.nonzero_parameters,
            "macs": self.after.macs,
            "parameters_before": self.before.parameters,
            "macs_before": self.before.macs,
            **{k: v for k, v in self.quality.items() if k.endswith("_db")},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "architecture": self.architecture,
            "size": self.size,
            "method": self.config.method,
            "rate": self.config.rate,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "groups": [g.to_dict() for g in self.groups],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "ratios": self.ratios(),
            "quality": self.quality,
            "finetune": self.finetune,
            "seconds": self.seconds,
            "notes": self.notes,
        }


def default_output_name(source: Path, cfg: PruneConfig) -> Path:
    """``<stem>_pruned-<method>-<percent>.pt`` in the current folder, e.g. ``tinybeauty_demo_pruned-channel-30.pt``."""
    percent = f"{cfg.rate * 100:g}".replace(".", "p")
    return Path(f"{source.stem}_pruned-{cfg.method}-{percent}.pt")


def _layer_reports(before: Mapping[str, torch.Tensor], model: nn.Module, excluded: set[str],
                   thresholds: Mapping[str, float | None]) -> list[LayerReport]:
    rows = []
    for name, m in prunable_layers(model).items():
        w = m.weight.detach()
        old = before[name]
        rows.append(LayerReport(
            name=name, kind=type(m).__name__, shape_before=list(old.shape), shape_after=list(w.shape),
            weights_before=old.numel(), weights_after=w.numel(), nonzero_after=int(torch.count_nonzero(w)),
            excluded=name in excluded, threshold=thresholds.get(name)))
    return rows


def _totals(model: nn.Module, size: int, channels: int) -> ModelTotals:
    params, nonzero = count_parameters(model)
    return ModelTotals(params, nonzero, count_macs(model, size, channels))


def _sizes_in_artifact_format(artifact: Artifact) -> tuple[int, int]:
    """(bytes, zipped bytes) of ``artifact`` saved as a tbopt artifact, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="tbopt-size-") as tmp:
        path = Path(tmp) / "model.pt"
        save_artifact(artifact, path)
        return size_on_disk(path), zipped_size(path)


def rebuild_check(artifact: Artifact, pruned: nn.Module, example: torch.Tensor) -> None:
    """The saved artifact must rebuild, from its architecture record and shapes alone, into ``pruned``."""
    rebuilt = artifact.build_model()
    with torch.inference_mode():
        a, b = rebuilt(example), pruned.eval()(example)
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise UnsupportedError(
            f"the pruned {artifact.arch.describe()} does not rebuild from its state dict "
            f"(max difference {float((a - b).abs().max()) if a.shape == b.shape else 'shape'})",
            hint="its constructor must be able to take the narrower layers; see README 'tbopt prune'")


def _arch_for(artifact: Artifact, model: nn.Module) -> ArchSpec:
    if artifact.arch.name == "tinybeauty":
        return ArchSpec.tinybeauty(config_from_state_dict(model.state_dict()))
    return artifact.arch


def unlabeled_images(data: Path | None, size: int, count: int) -> ImageSet:
    """Distillation / calibration images: a folder (pairs: inputs only) or synthetic portraits."""
    if data is None:
        return synthetic_unlabeled(count, size)
    images = load_folder(Path(data), size)
    return ImageSet(images.names, images.inputs, None, images.source)


def _evaluate(module: nn.Module, loaded: LoadedModel, images: ImageSet, reference: np.ndarray | None,
              progress: Progress, description: str) -> Evaluation:
    module.eval()
    runner = TorchRunner(module, loaded.preprocessing, loaded=None)
    return evaluate(runner, images, reference=reference, progress=progress, description=description)


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 3)


@contextlib.contextmanager
def _timer(seconds: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t0, 2)


def prune_loaded(loaded: LoadedModel, cfg: PruneConfig, *, data: Path | None = None,
                 eval_images: ImageSet | None = None, progress: Progress | None = None,
                 ) -> tuple[Artifact, nn.Module, PruneReport]:
    """Prune a loaded float model, fine-tune it, score it; nothing is written.

    Returns the new artifact (history extended by this step), the pruned module and
    the report (sizes not filled in: they need the file).
    """
    progress = progress or SilentProgress()
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    if loaded.kind != "float" or loaded.artifact is None:
        raise UnsupportedError(f"{loaded.path} is a {loaded.kind} model; prune needs a float checkpoint "
                               f"(prune before quantizing or exporting)")
    original = loaded.module.eval()
    layers = _require_conv_layers(original)
    excluded = excluded_layers(layers, cfg.exclude)
    size = loaded.preprocessing.size
    channels = input_channels(original)
    eval_images = eval_images or builtin_test_set(size)
    if eval_images.inputs.shape[1] != size:
        raise ConfigError(f"evaluation images are {eval_images.inputs.shape[1]}px but the model takes {size}px")

    notes: list[str] = []
    pool: torch.Tensor | None = None
    pool_source = None
    needs_pool = cfg.rate > 0 and (cfg.steps > 0 or cfg.method == PruneMethod.channel.value)
    if needs_pool:
        count = max(cfg.finetune_images, cfg.calibration_images) if cfg.steps > 0 else cfg.calibration_images
        images = unlabeled_images(data, size, count)
        pool = torch.from_numpy(uint8_to_model(images.inputs))
        pool_source = images.source

    with _timer(seconds, "evaluate"):
        base = _evaluate(original, loaded, eval_images, None, progress, "scoring the input model")
    reference = base.outputs

    model = copy.deepcopy(original)
    before_weights = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    thresholds: dict[str, float | None] = {}
    groups: list[ChannelGroup] = []
    with _timer(seconds, "prune"):
        if cfg.method == PruneMethod.channel.value:
            assert pool is not None or cfg.rate == 0
            calibration = pool[: cfg.calibration_images] if pool is not None else None
            if calibration is not None:
                groups = prune_channels(model, cfg.rate, calibration, exclude=excluded)
        else:
            thresholds = prune_magnitude(model, cfg.rate, global_threshold=cfg.method == PruneMethod.global_.value,
                                         exclude=excluded)
    model.eval()
    layer_rows = _layer_reports(before_weights, model, excluded, thresholds)
    changed = any(r.nonzero_after != int(torch.count_nonzero(before_weights[r.name])) or
                  r.shape_after != r.shape_before for r in layer_rows)

    quality: dict[str, Any] = {"images": eval_images.source, "target_psnr_before_db": _r(base.target_psnr_db)}
    finetune: dict[str, Any] = {"steps": 0, "images": None, "first_loss": None, "last_loss": None}
    steps = cfg.steps if changed else 0
    if cfg.steps > 0 and not changed:
        notes.append("nothing was pruned, so there was nothing to fine-tune")
    if steps > 0:
        with _timer(seconds, "evaluate"):
            raw = _evaluate(model, loaded, eval_images, reference, progress, "scoring before fine-tuning")
        quality["target_psnr_pruned_only_db"] = _r(raw.target_psnr_db)
        quality["fidelity_pruned_only_db"] = _r(raw.fidelity_psnr_db)
        teacher = copy.deepcopy(original)
        with _timer(seconds, "finetune"):
            losses = distill(model, teacher, pool, cfg, progress=progress)
        finetune = {"steps": len(losses), "images": pool_source, "batch_size": cfg.batch_size, "lr": cfg.lr,
                    "first_loss": _r6(losses[0]), "last_loss": _r6(float(np.mean(losses[-10:])))}
    with _timer(seconds, "evaluate"):
        final = _evaluate(model, loaded, eval_images, reference, progress, "scoring the pruned model")
    quality.update({
        "target_psnr_after_db": _r(final.target_psnr_db),
        "do_nothing_psnr_db": _r(final.do_nothing_psnr_db),
        "fidelity_psnr_db": _r(final.fidelity_psnr_db),
        "worst_fidelity_db": _r(final.worst_fidelity_db),
    })
    if base.target_psnr_db is not None and final.target_psnr_db is not None:
        quality["target_psnr_change_db"] = _r(final.target_psnr_db - base.target_psnr_db)

    before = _totals(original, size, channels)
    after = _totals(model, size, channels)
    notes.extend(_method_notes(cfg, layer_rows, groups, before, after, excluded))
    report = PruneReport(
        input=str(loaded.path), output=None, architecture=loaded.artifact.arch.describe(), size=size, config=cfg,
        layers=layer_rows, groups=groups, before=before, after=after, quality=quality, finetune=finetune,
        seconds=seconds, notes=notes)
    step = HistoryStep.now("prune", cfg.command_line(), cfg.to_dict(), report.figures())
    artifact = loaded.artifact.with_step(model, step, arch=_arch_for(loaded.artifact, model))
    rebuild_check(artifact, model, torch.from_numpy(uint8_to_model(eval_images.inputs[:1])))
    report.architecture = artifact.arch.describe()
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    return artifact, model, report


def _r6(v: float) -> float:
    return round(float(v), 6)


def _method_notes(cfg: PruneConfig, rows: list[LayerReport], groups: list[ChannelGroup],
                  before: ModelTotals, after: ModelTotals, excluded: set[str]) -> list[str]:
    notes = []
    if cfg.method in (PruneMethod.magnitude.value, PruneMethod.global_.value) and cfg.rate > 0:
        notes.append("unstructured pruning: the zeros are still stored and still multiplied, so the dense file "
                     "keeps its size and dense inference (PyTorch, Core ML) is not faster; the zipped size "
                     "shrinks, and a sparse format or runtime could use the zeros")
        pruned = [r for r in rows if not r.excluded]
        if cfg.method == PruneMethod.global_.value and pruned:
            lo = min(pruned, key=lambda r: r.sparsity)
            hi = max(pruned, key=lambda r: r.sparsity)
            notes.append(f"one threshold for all layers prunes them unevenly: from {lo.sparsity:.1%} "
                         f"({lo.name}, {lo.weights_after:,} weights) to {hi.sparsity:.1%} "
                         f"({hi.name}, {hi.weights_after:,} weights)")
    if cfg.method == PruneMethod.channel.value and cfg.rate > 0:
        if groups:
            kept = sorted({(g.channels_before, g.channels_after) for g in groups})
            shown = ", ".join(f"{b} -> {a}" for b, a in kept)
            notes.append(f"{len(groups)} channel groups pruned (channels {shown}); the network's input and "
                         f"output channels are kept")
        else:
            notes.append("no channel group could be pruned at this rate")
    if excluded:
        notes.append(f"excluded from pruning: {', '.join(sorted(excluded))}")
    return notes


def prune(path: Path | str, cfg: PruneConfig, *, output: Path | str | None = None, force: bool = False,
          data: Path | None = None, eval_data: Path | None = None, eval_limit: int | None = None,
          arch: str | None = None, arch_kwargs: str | Mapping[str, Any] | None = None,
          trust_pickle: bool = False, threads: int | None = None,
          progress: Progress | None = None) -> PruneReport:
    """``tbopt prune``: load, prune, fine-tune, score, write a tbopt artifact, measure it.

    ``threads`` sets PyTorch's CPU threads for the whole step (restored afterwards).
    """
    with _torch_threads(threads):
        return _prune_file(Path(path), cfg, output, force, data, eval_data, eval_limit,
                           dict(arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle), progress)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    with torch_threads(threads):
        yield


def _prune_file(path: Path, cfg: PruneConfig, output: Path | str | None, force: bool, data: Path | None,
                eval_data: Path | None, eval_limit: int | None, model_options: dict[str, Any],
                progress: Progress | None) -> PruneReport:
    out_path = Path(output) if output is not None else default_output_name(path, cfg)
    check_output(out_path, force, inputs=(path,))
    if eval_limit is not None and eval_limit < 1:
        raise UsageError(f"--limit must be >= 1, got {eval_limit}")
    loaded = load_model(path, **model_options)
    size = loaded.preprocessing.size
    eval_images = (builtin_test_set(size, eval_limit) if eval_data is None
                   else load_folder(Path(eval_data), size, eval_limit))
    artifact, _model, report = prune_loaded(loaded, cfg, data=data, eval_images=eval_images, progress=progress)
    t0 = time.perf_counter()
    save_artifact(artifact, out_path, force=force)
    base_bytes, base_zipped = _sizes_in_artifact_format(loaded.artifact)
    report.before.size_bytes, report.before.zipped_bytes = base_bytes, base_zipped
    report.after.size_bytes, report.after.zipped_bytes = size_on_disk(out_path), zipped_size(out_path)
    report.output = str(out_path)
    report.seconds["write"] = round(time.perf_counter() - t0, 2)
    report.seconds["total"] = round(report.seconds["total"] + report.seconds["write"], 2)
    return report
