"""The pruning transform, module in and module out: copy the model, prune it, fine-tune it, report.

Three methods (:class:`~.config.PruneMethod`), for TinyBeauty or a user's own conv network:

* ``magnitude`` -- in every Conv2d / ConvTranspose2d, weights whose magnitude is at most
  the layer's ``rate``-quantile become 0 (:mod:`.magnitude`).
* ``global`` -- the same rule with one quantile over all those layers together.
* ``channel`` -- whole channels are removed, coupled layers together, and every conv is
  refitted to the original's outputs (:mod:`.channel`).

Unstructured zeros neither shrink a dense file nor make dense kernels faster: the report's
notes say so. Any method can be followed by a short distillation from the unpruned model
(:mod:`.distill`). Nothing here opens a file or scores the evaluation images: the caller
does, and fills the report's ``quality``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..core.artifact import Preprocessing
from ..core.counts import count_macs, count_parameters, input_channels
from ..core.errors import ConfigError
from ..core.progress import Progress, SilentProgress
from .channel import prune_channels
from .config import PruneConfig, PruneMethod
from .distill import distill
from .layers import excluded_layers, prunable_layers, require_conv_layers
from .magnitude import prune_magnitude
from .report import ChannelGroup, LayerReport, ModelTotals, PruneReport, method_notes


def prune_module(model: nn.Module, config: PruneConfig, data: torch.Tensor | None = None, *,
                 size: int | None = None, before_finetune: Callable[[nn.Module], None] | None = None,
                 progress: Progress | None = None, continue_from: tuple[nn.Module, int] | None = None
                 ) -> tuple[nn.Module, PruneReport]:
    """Prune a copy of ``model`` as ``config`` says, fine-tune it when ``config.steps > 0``; ``model`` is left as is.

    ``data``: unlabeled images in model space, float (N, 3, S, S) in [-1, 1], on which
    channels are ranked and refitted (the first ``config.calibration_images``) and the
    copy is distilled from ``model`` (all of them); needed by ``channel`` pruning and by
    fine-tuning. ``size``: the input size (px) at which MACs are counted (default: the
    data's, else the artifact format's default). ``before_finetune`` is called with the
    pruned model just before fine-tuning starts (only when it does), e.g. to score it.

    ``continue_from``: ``(module, steps)``, the same pruning of ``model`` already distilled for
    ``steps`` of ``config.steps``: its weights are the start and only the remaining steps are taken
    (nothing is pruned again).

    Returns the pruned model (in eval mode) and a report of what was done; the report's
    ``quality`` is empty, its ``input`` None and its ``architecture`` the model's class.
    """
    progress = progress or SilentProgress()
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    excluded = excluded_layers(require_conv_layers(model), config.exclude)
    if size is None:
        size = int(data.shape[-1]) if data is not None else Preprocessing().size
    channels = input_channels(model)

    start = continue_from[1] if continue_from is not None else 0
    if not 0 <= start < max(config.steps, 1):
        raise ConfigError(f"a distillation of {start} steps cannot be continued to {config.steps}")
    pruned = copy.deepcopy(model if continue_from is None else continue_from[0]).eval()
    before_weights = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    thresholds: dict[str, float | None] = {}
    groups: list[ChannelGroup] = []
    with _timer(seconds, "prune"):
        if continue_from is not None:
            pass  # pruned (and partly distilled) already
        elif config.method == PruneMethod.channel.value:
            if config.any_pruning:
                calibration = _required(data, "channel pruning ranks and refits channels on them")
                groups = prune_channels(pruned, config.rate, calibration[: config.calibration_images],
                                        exclude=excluded, group_rates=group_rates_of(model, config),
                                        progress=progress)
        else:
            thresholds = prune_magnitude(pruned, config.rate, exclude=excluded,
                                         global_threshold=config.method == PruneMethod.global_.value)
    pruned.eval()
    layer_rows = _layer_reports(before_weights, pruned, excluded, thresholds)
    changed = continue_from is not None or any(
        r.nonzero_after != int(torch.count_nonzero(before_weights[r.name])) or r.shape_after != r.shape_before
        for r in layer_rows)

    notes: list[str] = []
    finetune: dict[str, Any] = {"steps": 0, "images": None, "first_loss": None, "last_loss": None}
    if config.steps > 0 and not changed:
        notes.append("nothing was pruned, so there was nothing to fine-tune")
    if config.steps > 0 and changed:
        images = _required(data, "fine-tuning distills the unpruned model into the pruned one on them")
        if before_finetune is not None:
            before_finetune(pruned)
        teacher = copy.deepcopy(model)
        with _timer(seconds, "finetune"):
            losses = distill(pruned, teacher, images, config, progress=progress, start=start)
        # "images" says where the images came from: the caller, who knows, fills it in.
        finetune = {"steps": start + len(losses), "continued_from_step": start, "images": None,
                    "batch_size": config.batch_size, "lr": config.lr,
                    "loss": config.loss,
                    "first_loss": _r6(losses[0]), "last_loss": _r6(float(np.mean(losses[-10:])))}

    notes.extend(method_notes(config, layer_rows, groups, excluded))
    report = PruneReport(
        input=None, output=None, architecture=type(model).__name__, size=size, config=config, layers=layer_rows,
        groups=groups, before=_totals(model, size, channels), after=_totals(pruned, size, channels), quality={},
        finetune=finetune, seconds=seconds, notes=notes)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    return pruned, report


def group_rates_of(model: nn.Module, config: PruneConfig) -> dict[str, float]:
    """``config.group_rates`` as conv layer name -> rate (each pattern must match a conv layer;
    a layer matched by two patterns with different rates is an error)."""
    layers = require_conv_layers(model)
    rates: dict[str, float] = {}
    for pattern, rate in config.group_rates:
        for name in excluded_layers(layers, [pattern], option="--group-rate"):
            if name in rates and rates[name] != rate:
                raise ConfigError(f"--group-rate gives {name} two rates ({rates[name]:g} and {rate:g})")
            rates[name] = rate
    return rates


def _required(data: torch.Tensor | None, why: str) -> torch.Tensor:
    if data is None or len(data) == 0:
        raise ConfigError(f"no unlabeled images given: {why}")
    return data


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


def _r6(v: float) -> float:
    return round(float(v), 6)


@contextlib.contextmanager
def _timer(seconds: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t0, 2)
