"""Unstructured magnitude pruning: zero the smallest conv weights, per layer or with one global threshold.

Zeros already present count toward the quantile, so pruning a pruned model again at
the same rate removes nothing more. Biases and norm parameters are left alone.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from .layers import require_conv_layers


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
    layers = require_conv_layers(model)
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
