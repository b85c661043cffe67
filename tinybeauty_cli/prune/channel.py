"""Structured channel pruning: whole channels removed, so tensors really get smaller and the network faster.

Coupled layers (the residual stream through every residual block, the concatenation
skips, the custom LayerNorm's ``gamma``/``beta``) are found by torch-pruning's
dependency graph (DepGraph) and pruned together; the network's input and output
channels are kept. Channels are ranked by how much the layers reading them use them;
after the cut, every conv is refitted by least squares to reproduce the original
conv's output (layer by layer, on calibration images).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import UnsupportedError
from ..core.model import LayerNorm
from ..core.progress import Progress, SilentProgress
from .layers import PRUNABLE_TYPES, require_conv_layers
from .report import ChannelGroup


def _torch_pruning():
    """torch-pruning, imported when channel pruning is asked for, its import-time warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp
    return tp


def layer_norm_pruner():
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
                       rows_per_batch: int = 4096, ridge: float = 1e-3,
                       on_layer: Callable[[], None] | None = None) -> list[str]:
    """Refit every plain conv of ``pruned``, in execution order, to reproduce ``original``'s outputs.

    For each conv: its input as the pruned network now computes it (earlier layers
    already refitted), its target the original conv's output at the same pixels (kept
    output channels only), and a ridge-regularised least-squares fit of weights and
    bias, pulled toward the current weights. Pruning errors then stop compounding
    from layer to layer, which is most of what a channel cut costs before fine-tuning.
    Returns the names of the refitted layers; ``on_layer()`` is called after each.
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
        if on_layer is not None:
            on_layer()
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


def _produces(dep: Any, graph: Any) -> bool:
    """True if ``dep`` cuts a conv's output channels (a depthwise conv's too: its pruner cuts both sides)."""
    tp = _torch_pruning()
    return isinstance(dep.target.module, tp.ops.TORCH_CONV) and graph.is_out_channel_pruning_fn(dep.handler)


def _channel_groups(graph: Any, model: nn.Module) -> Callable[[Any], int]:
    """How many equal groups the channels of a dependency's layer fall into (GroupNorm's ``num_groups``,
    a grouped conv's ``groups``); 1 for a depthwise conv, which is cut channel by channel."""
    tp = _torch_pruning()

    def of(dep: Any) -> int:
        m = dep.target.module
        if not isinstance(m, nn.Module) or (isinstance(m, tp.ops.TORCH_CONV) and m.groups == m.out_channels):
            return 1
        pruner = graph.get_pruner_of_module(m)
        if pruner is None:
            return 1
        if graph.is_out_channel_pruning_fn(dep.handler):
            return int(pruner.get_out_channel_groups(m))
        return int(pruner.get_in_channel_groups(m))

    return of


def _module_states(group: Any) -> list[tuple[nn.Module, dict[str, Any]]]:
    """What pruning ``group`` changes in its layers (attributes, parameters, buffers), to undo it."""
    states = []
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Module) and all(m is not s for s, _ in states):
            states.append((m, {**vars(m), "_parameters": dict(m._parameters), "_buffers": dict(m._buffers)}))
    return states


def _restore(states: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, state in states:
        vars(m).clear()
        vars(m).update({**state, "_parameters": dict(state["_parameters"]), "_buffers": dict(state["_buffers"])})


def _cannot_run(model: nn.Module, example: torch.Tensor, out_shape: tuple[int, ...]) -> str:
    """Why ``model`` no longer gives an output of ``out_shape`` on ``example`` ('' if it does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape = tuple(model(example).shape)
    except (RuntimeError, ValueError, IndexError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "" if shape == out_shape else f"the output would change from {out_shape} to {shape}"


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
                   exclude: Iterable[str] = (), reconstruct: bool = True,
                   group_rates: Mapping[str, float] | None = None,
                   progress: Progress | None = None) -> list[ChannelGroup]:
    """Remove ``rate`` of the channels of every prunable group of ``model``, in place.

    ``group_rates`` (conv layer name -> rate) gives a group whose channels one of those convs
    produces its own rate instead.

    Groups come from torch-pruning's DepGraph, so everything that shares channels is
    cut together. A group is left whole when one of its convs is excluded, or when it
    reaches the output (the network must still return its 3 channels); the input's
    channels have no producing layer and are never touched. Channels are ranked by
    :func:`channel_importance` on ``calibration`` images. With ``reconstruct``, every
    conv is then refitted so that, given what the pruned layers before it now produce,
    it reproduces the original conv's output on those images (:func:`reconstruct_layers`).
    ``progress`` reports the ranking and the refit.
    """
    progress = progress or SilentProgress()
    tp = _torch_pruning()
    layers = require_conv_layers(model)
    names = {m: n for n, m in model.named_modules()}
    excluded_modules = [layers[n] for n in exclude]
    group_rates = dict(group_rates or {})
    if rate <= 0 and not any(r > 0 for r in group_rates.values()):
        return []
    example = calibration[:1]
    original = copy.deepcopy(model).eval() if reconstruct else None
    with torch.no_grad():
        out_shape_before = tuple(model(example).shape)
    with progress.task("channel pruning: activations for ranking", total=None):
        rms = input_channel_rms(model, calibration)
    with warnings.catch_warnings(), torch.enable_grad(), \
            progress.task("channel pruning: dependency graph", total=None):  # DepGraph traces the autograd graph
        warnings.simplefilter("ignore")  # its notes on unwrapped parameters and tracing
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners={LayerNorm: layer_norm_pruner()})
        groups = list(graph.get_all_groups(ignored_layers=excluded_modules,
                                           root_module_types=list(PRUNABLE_TYPES)))
    channel_groups = _channel_groups(graph, model)
    plans = []
    for group in groups:
        if _touches_output(group):
            continue
        root = group[0].dep.target.module
        channels = len(group[0].idxs)
        producers = [names[dep.target.module] for dep, _ in group if _produces(dep, graph)]
        split = max([channel_groups(dep) for dep, _ in group] + [1])
        if channels % split:
            continue  # pragma: no cover - a grouped layer's width is a multiple of its groups
        k = _removal_count(channels // split, next((group_rates[p] for p in producers if p in group_rates), rate))
        if k <= 0:
            continue
        score, consumers = channel_importance(group, rms)
        if not consumers:
            continue  # nothing reads these channels through a weight: no way to rank them
        # Grouped layers (GroupNorm, grouped convs) keep their groups whole and equal: the same positions
        # are cut in every group, ranked by their mean importance, as torch-pruning's own pruners do.
        per_group = score.view(split, -1).mean(0)
        cut = torch.argsort(per_group, stable=True)[:k]
        removed = sorted(int(g * (channels // split) + i) for g in range(split) for i in cut)
        plans.append((group, root, removed, ChannelGroup(
            layers=list(dict.fromkeys(producers)), consumers=[names[c] for c in consumers],
            channels_before=channels, channels_after=channels - len(removed), removed=removed,
            importance=[float(v) for v in score])))
    # Importance was measured on the intact model; indices of one group are unaffected
    # by pruning another (DepGraph groups are disjoint), so prune one after another. A cut that
    # leaves the network unable to run (an op torch-pruning does not know how to cut, such as
    # PixelShuffle's channel blocks) is undone and that group is left whole.
    producer_cuts: dict[str, set[int]] = {}
    done = []
    with torch.no_grad():
        for group, root, removed, plan in plans:
            pruning = graph.get_pruning_group(root, group[0].dep.handler, removed)
            if not graph.check_pruning_group(pruning):  # pragma: no cover - guarded by _removal_count
                raise UnsupportedError(f"torch-pruning refused to prune {names[root]}")
            saved = _module_states(pruning)
            pruning.prune()
            why = _cannot_run(model, example, out_shape_before)
            if why:
                _restore(saved)
                plan.channels_after, plan.removed = plan.channels_before, []
                plan.left_whole = why
                done.append(plan)
                continue
            for i, (dep, idxs) in enumerate(group):
                if _produces(dep, graph):
                    cut = {ix for ix, r in zip(idxs, group[i].root_idxs) if r in set(removed)}
                    producer_cuts.setdefault(names[dep.layer], set()).update(cut)
            done.append(plan)
        _sync_norm_widths(model, example)
        out_shape_after = tuple(model(example).shape)
    if out_shape_after != out_shape_before:  # pragma: no cover - each cut was checked
        raise UnsupportedError(
            f"channel pruning changed the network's output from {out_shape_before} to {out_shape_after}",
            hint="keep the layers that produce the output with --exclude")
    plans = [(None, None, None, p) for p in done]
    if reconstruct and producer_cuts:
        convs = sum(1 for m in model.modules() if _plain_conv(m))
        with progress.task("channel pruning: refitting convs", total=convs) as advance:
            reconstruct_layers(model, original, calibration, producer_cuts, on_layer=advance)
    return [plan for *_, plan in plans]
