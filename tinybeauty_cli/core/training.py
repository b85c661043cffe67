"""A small, deterministic training loop shared by the demo trainer and distillation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .quality import made_up

#: ``batch_fn(step, generator) -> (inputs, targets)``, both (N, 3, H, W) in [-1, 1].
BatchFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FitConfig:
    steps: int
    lr: float = 2e-3
    lr_min: float = 1e-5
    warmup: int = 50
    seed: int = 0
    weight_decay: float = 0.0
    #: Strength of an L1 penalty ``l1 * sum(|w|)`` on the ``penalized`` parameters of :func:`fit`:
    #: it drives weights that matter little towards zero, so that magnitude pruning later removes
    #: little of what the network computes.
    l1: float = 0.0


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    batch_fn: BatchFn,
    cfg: FitConfig,
    *,
    after_step: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    penalized: Iterable[nn.Parameter] = (),
) -> FitResult:
    """Adam with linear warm-up and cosine decay; L1 between made-up images and targets.

    ``after_step`` runs after every optimizer step (e.g. to re-apply a pruning mask,
    so that zeros stay zero). With ``cfg.l1 > 0`` the ``penalized`` parameters carry an L1
    penalty; the losses reported are the image loss alone.
    """
    penalized = list(penalized)
    if cfg.l1 > 0 and not penalized:
        raise ValueError("FitConfig.l1 > 0 needs the parameters to penalize")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=cfg.lr,
                           weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))

    result = FitResult()
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, target = batch_fn(step, gen)
        loss = (made_up(x, model(x)) - target).abs().mean()
        total = loss + cfg.l1 * sum(p.abs().sum() for p in penalized) if cfg.l1 > 0 else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(model)
        value = float(loss.detach())
        result.losses.append(value)
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return result
