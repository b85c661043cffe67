"""What ``tbopt prune`` can be told: the method, the rate, how to recover. No torch here: the CLI
imports this module to build its options and help text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Mapping

from ..core.errors import ConfigError, UsageError

CONFIG_VERSION = 1
#: Fine-tuning steps ``channel`` pruning takes when none are asked for: with the defaults below they
#: bring rate 0.3 back within the 0.3 dB budget in under 90 s on 2 cores (what they measured, and
#: what else was tried: docs/tried-and-measured.md; benchmarks/prune_figures.py measures it again).
DEFAULT_CHANNEL_FINETUNE_STEPS = 750


class PruneMethod(str, Enum):
    magnitude = "magnitude"
    global_ = "global"
    channel = "channel"


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how to recover; ``to_dict()`` goes into the artifact's history and ``--json``.

    ``finetune_steps=None`` means the method's default: none for unstructured
    pruning (it barely moves the output), :data:`DEFAULT_CHANNEL_FINETUNE_STEPS` for
    channel pruning (removing channels does).
    """

    rate: float
    method: str = PruneMethod.magnitude.value
    finetune_steps: int | None = None
    exclude: tuple[str, ...] = ()
    seed: int = 0
    #: ``channel`` only: other rates for some channel groups, as (layer pattern, rate) pairs; a group
    #: takes the rate of the pattern that matches one of the convs producing its channels (a module
    #: name, a parent module or a glob, as ``exclude``). For a CPU, pruning the groups that work at
    #: full resolution harder pays most: their norms, padding and (de)quantization passes grow with
    #: the pixels, and int8 kernels run widths that are multiples of 8 best.
    group_rates: tuple[tuple[str, float], ...] = ()
    #: Whole images per fine-tuning step, and Adam's peak learning rate (linear warm-up over a
    #: quarter of the steps, then cosine decay: a refitted model is close enough that a short
    #: warm-up at this rate first undoes part of the refit).
    batch_size: int = 2
    lr: float = 2e-3
    #: The distillation loss between made-up images: "l2" (squared difference, what PSNR measures)
    #: or "l1".
    loss: str = "l2"
    #: Distillation images drawn when no ``--calib`` folder is given (synthetic portraits). More
    #: images recover more in the same steps; each costs its drawing and two teacher passes (it and
    #: its mirror image).
    finetune_images: int = 192
    #: Images on which channel importance is measured.
    calibration_images: int = 16
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        method = self.method.value if isinstance(self.method, PruneMethod) else str(self.method)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "exclude", tuple(str(e) for e in self.exclude))
        if method not in {m.value for m in PruneMethod}:
            raise UsageError(f"unknown pruning method {method!r}; choose magnitude, global or channel")
        rate = float(self.rate)
        if not math.isfinite(rate) or not 0.0 <= rate < 1.0:
            raise UsageError(f"--rate must be in [0, 1) (the fraction to remove), got {self.rate}",
                             hint="e.g. --rate 0.3 removes 30%")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "group_rates", parse_group_rates(self.group_rates))
        if self.group_rates and method != PruneMethod.channel.value:
            raise UsageError("--group-rate applies to --method channel only")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise UsageError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        for name in ("batch_size", "finetune_images", "calibration_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("l1", "l2"):
            raise ConfigError(f"loss must be 'l1' or 'l2', got {self.loss!r}")

    @property
    def steps(self) -> int:
        """Fine-tuning steps actually taken (the method's default when not given)."""
        if self.finetune_steps is not None:
            return self.finetune_steps
        return DEFAULT_CHANNEL_FINETUNE_STEPS if self.method == PruneMethod.channel.value else 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["finetune_steps"] = self.steps
        d["group_rates"] = {pattern: r for pattern, r in self.group_rates}
        if not self.group_rates:
            del d["group_rates"]  # histories written before the option stay byte-identical
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PruneConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items() if k in known})

    @property
    def any_pruning(self) -> bool:
        """Whether anything is to be removed (a rate or a group's rate above 0)."""
        return self.rate > 0 or any(r > 0 for _, r in self.group_rates)

    def command_line(self) -> str:
        parts = [f"tbopt prune --method {self.method} --rate {self.rate:g} --finetune-steps {self.steps}"]
        parts += [f"--exclude {e}" for e in self.exclude]
        parts += [f"--group-rate {pattern}={r:g}" for pattern, r in self.group_rates]
        if self.seed:
            parts.append(f"--seed {self.seed}")
        return " ".join(parts)


def parse_group_rates(value: Any) -> tuple[tuple[str, float], ...]:
    """``--group-rate`` values (``"PATTERN=RATE"`` strings, pairs, or a mapping) as (pattern, rate) pairs."""
    items = value.items() if isinstance(value, Mapping) else value or ()
    pairs: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            pattern, sep, text = item.partition("=")
            if not sep or not pattern.strip():
                raise UsageError(f"--group-rate takes LAYER=RATE, got {item!r}", hint="e.g. --group-rate upconv2=0.66")
            try:
                r = float(text)
            except ValueError:
                raise UsageError(f"--group-rate {item!r}: {text!r} is not a number") from None
        else:
            pattern, r = item
            r = float(r)
        pattern = str(pattern).strip()
        if not math.isfinite(r) or not 0.0 <= r < 1.0:
            raise UsageError(f"--group-rate {pattern}={r:g}: a rate must be in [0, 1) (the fraction to remove)")
        if any(p == pattern for p, _ in pairs):
            raise UsageError(f"--group-rate names {pattern!r} twice")
        pairs.append((pattern, r))
    return tuple(pairs)
