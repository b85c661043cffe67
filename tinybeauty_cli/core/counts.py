"""How big a module is: parameters (and how many are non-zero) and multiply-accumulates per image."""

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
