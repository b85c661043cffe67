"""Recovery after pruning: distillation from the unpruned model (the teacher) into the pruned one.

The loss is L1 between the two models' made-up images, on unlabeled images (a folder,
or synthetic portraits -- never the evaluation images).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up
from ..core.training import FitConfig, fit
from .config import PruneConfig
from .layers import prunable_layers


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
            y = made_up(x, teacher(x))
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
