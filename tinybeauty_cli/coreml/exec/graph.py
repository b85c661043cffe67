"""The compiled form both reference executors produce: an :class:`OpGraph`, a flat list of steps,
each a PyTorch call whose constant operands (weights, pads, axes...) were decoded once, at
compile time. Running the graph is then a loop over tensors in numbered slots, with no
re-interpretation of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...core.errors import InputError, UnsupportedError


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    """Round a float tensor to the nearest fp16 value (kept as fp32), as fp16 hardware stores it."""
    if t.is_floating_point():
        return t.to(torch.float16).to(torch.float32)
    return t


@dataclass
class Step:
    """One op: ``outputs = fn(*inputs)`` over slot numbers."""

    name: str
    kind: str
    fn: Callable[..., Any]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    #: Positions (in ``outputs``) to round to fp16 after the op (fp16 emulation).
    rounded: tuple[int, ...] = ()
    #: Slots no later step reads: released after this step to keep memory flat.
    release: tuple[int, ...] = ()
    #: The model's names of ``outputs`` (what an observer of the run is told).
    names: tuple[str, ...] = ()


@dataclass
class OpGraph:
    """A compiled model: named input and output slots and the steps between them."""

    steps: list[Step]
    inputs: dict[str, int]
    outputs: dict[str, int]
    n_slots: int
    constants: dict[int, torch.Tensor] = field(default_factory=dict)  # outputs that are constants

    def run(self, feeds: dict[str, torch.Tensor],
            observe: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
        """The outputs for ``feeds``; ``observe(name, value)`` sees every op's output as it is made
        (activation calibration records their ranges)."""
        env: list[Any] = [None] * self.n_slots
        for slot, value in self.constants.items():
            env[slot] = value
        for name, slot in self.inputs.items():
            if name not in feeds:
                raise InputError(f"no value for model input {name!r}")
            env[slot] = feeds[name]
        step = None
        try:
            with torch.inference_mode():
                for step in self.steps:
                    out = step.fn(*[env[i] for i in step.inputs])
                    if len(step.outputs) == 1:
                        env[step.outputs[0]] = round_fp16(out) if step.rounded else out
                    else:
                        for k, (slot, value) in enumerate(zip(step.outputs, out)):
                            env[slot] = round_fp16(value) if k in step.rounded else value
                    if observe is not None:
                        for name, slot in zip(step.names, step.outputs):
                            observe(name, env[slot])
                    for slot in step.release:
                        env[slot] = None
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            where = f"{step.kind} {step.name!r}" if step is not None else "the model"
            raise InputError(f"the reference executor failed at {where}: {exc}") from exc
        return {name: env[slot] for name, slot in self.outputs.items()}

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts


class GraphBuilder:
    """Slot bookkeeping while compiling: names -> slots, constants, steps."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.consts: dict[str, Any] = {}
        self.steps: list[Step] = []
        self.const_slots: dict[int, torch.Tensor] = {}

    def slot(self, name: str) -> int:
        if name not in self.slots:
            self.slots[name] = len(self.slots)
        return self.slots[name]

    def add_step(self, name: str, kind: str, fn: Callable[..., Any], inputs: Sequence[str],
                 outputs: Sequence[str], rounded: Sequence[int] = ()) -> None:
        for i in inputs:
            if i not in self.slots and i in self.consts:  # a constant operand: a slot filled once per run
                self.const_slots[self.slot(i)] = as_tensor(self.consts[i])
            elif i not in self.slots:
                raise UnsupportedError(f"{kind} {name!r} reads {i!r}, which no earlier op produces")
        self.steps.append(Step(name, kind, fn, tuple(self.slots[i] for i in inputs),
                               tuple(self.slot(o) for o in outputs), tuple(rounded), names=tuple(outputs)))

    def finish(self, inputs: Sequence[str], outputs: Sequence[str]) -> OpGraph:
        """Resolve outputs (an output may be a constant or a graph input) and plan slot release."""
        const_slots = dict(self.const_slots)
        for o in outputs:
            if o not in self.slots and o in self.consts:
                const_slots[self.slot(o)] = as_tensor(self.consts[o])
            elif o not in self.slots:
                raise UnsupportedError(f"model output {o!r} is produced by no op")
        keep = {self.slots[o] for o in outputs} | set(const_slots)
        last_use: dict[int, int] = {}
        for k, step in enumerate(self.steps):
            for i in step.inputs:
                last_use[i] = k
        releases: dict[int, list[int]] = {}
        for slot, k in last_use.items():
            if slot not in keep:
                releases.setdefault(k, []).append(slot)
        for k, step in enumerate(self.steps):
            step.release = tuple(releases.get(k, ()))
        return OpGraph(self.steps, {n: self.slot(n) for n in inputs}, {n: self.slots[n] for n in outputs},
                       len(self.slots), const_slots)


def as_tensor(value: Any) -> torch.Tensor:
    """A constant as a tensor: floats as float32 (fp16 values are exact in fp32), ints as int64."""
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if arr.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    if arr.dtype.kind == "b":
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise UnsupportedError(f"constant of type {arr.dtype} is not supported")
