"""Recovery after pruning: distillation from the unpruned model (the teacher) into the pruned one.

The loss is L2 (or L1) between the two models' made-up images, on unlabeled images (a folder,
or synthetic portraits -- never the evaluation images).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.progress import Progress, SilentProgress
from ..core.training import FitConfig, distillation_batches, fit
from .config import PruneConfig
from .layers import prunable_layers


def conv_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where each conv weight is non-zero (fine-tuning keeps the zeros zero)."""
    return {n: (m.weight.detach() != 0) for n, m in prunable_layers(model).items()}


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: PruneConfig,
            *, progress: Progress | None = None, start: int = 0) -> list[float]:
    """Fine-tune ``student`` to reproduce ``teacher``'s made-up images, in place.

    ``start``: steps of ``cfg.steps`` the student has already been distilled for (a shorter
    distillation of the same rate, seed and images): the distillation continues from there, at the
    learning rate and on the batches of a ``cfg.steps``-step schedule (``FitConfig.start``).

    Each step takes ``cfg.batch_size`` whole images from ``images`` (randomly flipped;
    the teacher sees exactly what the student sees, and its made-up image of each image and
    flip is computed once: :func:`~..core.training.distillation_batches`). The loss is
    ``cfg.loss`` (L2 by default: the squared error PSNR measures); Adam warms up over a quarter of
    the steps, then decays (cosine). Whole images at full size, not crops: InstanceNorm and
    LayerNorm statistics of a crop differ from a whole face's (what else was tried, and what each
    measured: docs/tried-and-measured.md).
    Conv weights that are zero stay zero.
    Deterministic for ``cfg.seed`` (and the number of threads).
    """
    progress = progress or SilentProgress()
    steps = cfg.steps
    if steps <= 0:
        return []
    teacher = teacher.eval()  # its outputs are computed under no_grad: it is never trained
    masks = conv_masks(student)
    layers = prunable_layers(student)

    def keep_zeros(model: nn.Module) -> None:
        for name, m in layers.items():
            m.weight.mul_(masks[name])

    losses: list[float] = []
    with progress.task("fine-tuning (distillation)" + (f", continued from step {start}" if start else ""),
                       total=steps - start) as advance:
        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            advance(1, loss=loss)

        fit(student, distillation_batches(teacher, images, cfg.batch_size),
            FitConfig(steps=steps, lr=cfg.lr, warmup=steps // 4, seed=cfg.seed, loss=cfg.loss, start=start),
            after_step=keep_zeros, on_step=on_step)
    student.eval()
    return losses
