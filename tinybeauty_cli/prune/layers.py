"""Which layers pruning touches: every Conv2d / ConvTranspose2d, minus the ones ``--exclude`` names."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, InputError

#: Layers whose weights are pruned: the network's convolutions.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d / ConvTranspose2d by module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def require_conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """:func:`prunable_layers`, refusing a model that has none (there would be nothing to prune)."""
    layers = prunable_layers(model)
    if not layers:
        raise InputError(f"{type(model).__name__} has no Conv2d or ConvTranspose2d layer: nothing to prune")
    return layers


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def excluded_layers(layers: Iterable[str], patterns: Sequence[str], option: str = "--exclude") -> set[str]:
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
            raise ConfigError(f"{option} {pattern!r} matches no conv layer",
                              hint=f"conv layers are: {shown}")
        chosen |= hit
    return chosen


def full_resolution_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The convs whose outputs have the most pixels of any conv in the network (in an
    encoder-decoder, those at the input's resolution), leaving out those that produce the network's
    output. On a CPU their channels cost most beside the multiply-adds: the norms, padding and
    (de)quantization around each conv pass over every pixel of every channel."""
    layers = prunable_layers(model)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            shapes[name] = tuple(out.shape)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            output = tuple(model.eval()(example).shape)
    finally:
        for h in handles:
            h.remove()
    if not shapes:
        return []
    largest = max(s[-1] * s[-2] for s in shapes.values())
    return [n for n in layers if n in shapes and shapes[n][-1] * shapes[n][-2] == largest and shapes[n] != output]
