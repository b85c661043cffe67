"""The cost model of ``tbopt optimize``: seconds per unit of work, measured on this run.

The search's order is fixed (cheap, likely gains first, :mod:`.optimize_search`); what the cost model
decides is whether a step still fits the time budget. Every step the search makes is timed and its
seconds are put down per unit -- per distillation step, per export of each format, per scoring of
the image set, per GPTQ palettization, per palette-fit step, per int8 quantization, per channel
ranking and refit -- so that a machine twice as slow expects twice the seconds and leaves out the
same steps a proportionally shorter budget would, rather than starting a 2000-step distillation it
cannot finish. Before a unit has been seen its cost is estimated from the units measured so far
(:data:`PRIORS`, in scorings of the image set, which the search measures first).

No torch here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from ..core.progress import Progress

#: A unit's cost before it has been measured, in scorings of the image set (the first thing the
#: search times). These only decide whether a first step of a kind is started. Measured in one
#: search of the demo (100 images at 256 px, 2 threads, a scoring 4.5 s): a distillation step of
#: the model pruned at 0.3 a thirtieth of a scoring (0.15 s) and a palette-fit step as much, an export
#: 0.4-0.55, GPTQ palettes 1.8, palette bits by layer 2.3, an int8 quantization (calibration,
#: engine choice and timing) 2.5, channel ranking and refit 0.9; a chosen Core ML file scored by
#: the reference executor 1.3, the int8 files timed side by side 0.4. Two kinds happen once, at the
#: end, and keep their prior: the chosen int8 file timed in a plain process (a new Python process
#: that imports torch) 1.5, and the reports written (search.json, search.md, pareto.png) 1.
PRIORS = {"distill_step": 0.033, "fit_step": 0.031, "export:neuralnetwork": 0.4, "export:mlprogram": 0.55,
          "gptq": 1.8, "bits": 2.3, "quantize": 2.5, "prune": 0.9, "score": 1.0, "verify": 1.3, "timing": 0.4,
          "plain": 1.5, "report": 1.0}


@dataclass
class CostModel:
    """Seconds per unit of each kind of work, as measured in this search (medians are not needed:
    a kind's cost is the total seconds over the total units)."""

    seconds: dict[str, float] = field(default_factory=dict)
    units: dict[str, float] = field(default_factory=dict)

    def observe(self, kind: str, seconds: float, units: float = 1.0) -> None:
        if units <= 0 or seconds < 0:
            return
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.units[kind] = self.units.get(kind, 0.0) + units

    def measured(self, kind: str) -> bool:
        return kind in self.units

    def per(self, kind: str) -> float:
        """Seconds per unit of ``kind``: measured, else its prior in scorings (0 before any scoring)."""
        if kind in self.units:
            return self.seconds[kind] / self.units[kind]
        score = self.seconds["score"] / self.units["score"] if "score" in self.units else 0.0
        return PRIORS.get(kind, 0.0) * score

    def estimate(self, work: Mapping[str, float]) -> float:
        """Seconds for ``work`` (kind -> units)."""
        return sum(self.per(kind) * units for kind, units in work.items())

    def to_dict(self) -> dict[str, Any]:
        return {kind: {"seconds_per_unit": round(self.per(kind), 4), "units": round(self.units[kind], 1)}
                for kind in sorted(self.units)}


# -- the clock: a step stopped at the budget's end ----------------------------------------------------

class OutOfTime(Exception):
    """A step still running when the time budget ran out (the machine ran slower than the cost
    model expected, e.g. when its load rose mid-search)."""


class Clocked:
    """A :class:`~..core.progress.Progress` that raises :class:`OutOfTime` at the first advance past ``deadline``."""

    def __init__(self, inner: Progress, deadline: float):
        self.inner, self.deadline = inner, deadline

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        with self.inner.task(description, total=total) as advance:
            def clocked(*args: Any, **kwargs: Any) -> None:
                advance(*args, **kwargs)
                if time.perf_counter() > self.deadline:
                    raise OutOfTime(description)
            yield clocked

    def note(self, message: str) -> None:
        self.inner.note(message)
