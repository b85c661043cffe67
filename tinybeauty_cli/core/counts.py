"""How big a module is: parameters (and how many are non-zero), multiply-accumulates per image, and the
channels it takes."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for p in module.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero


def count_macs(module: nn.Module, size: int, channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at ``size`` x ``size`` (PyTorch's flop counter / 2).

    Dense MACs: zeros of unstructured pruning are still multiplied by a dense kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, size, size)
    was_training = module.training
    module.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return int(counter.get_total_flops() // 2)


def input_channels(model: nn.Module) -> int:
    """The channels the network takes: its first convolution's input channels (3 when it has none)."""
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            return int(mod.in_channels)
    return 3
