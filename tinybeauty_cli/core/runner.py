"""The interface every artifact kind is run through: ``predict(batch) -> made-up images``.

A batch is float32 (N, 3, S, S) in [-1, 1] at the model's size. ``residual`` is what
the network adds; ``predict`` is ``clamp(x + residual, -1, 1)``, the made-up face.
Commands that score, time or apply models (``apply``, ``bench``, ``compare``, ``run``)
only see this interface, so Core ML files and int8 TorchScript work like checkpoints.
The implementations live with what they run: ``runtime.runners`` (PyTorch) and
``coreml.runner`` (Core ML files).
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import numpy as np

from .artifact import Preprocessing
from .quality import made_up


class Runner(abc.ABC):
    """Base class: subclasses implement :meth:`residual` (and may override :meth:`predict`)."""

    #: "float" | "int8" | "coreml"
    kind: str = "float"
    #: How the numbers are computed, e.g. "PyTorch eager fp32".
    engine: str = ""
    preprocessing: Preprocessing = Preprocessing()
    batch_size: int = 8

    @property
    def off_device(self) -> bool:
        """True when a model that ships to a device is computed here by a stand-in (a Core ML file on
        tbopt's reference executor): its times are this CPU's arithmetic, not device latency."""
        return False

    @property
    def size(self) -> int:
        return self.preprocessing.size

    @abc.abstractmethod
    def residual(self, x: np.ndarray) -> np.ndarray:
        """What the network adds to the batch ``x`` (see the module docstring)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        return made_up(x, self.residual(x))

    def predict_all(self, x: np.ndarray, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """``predict`` over a large array in batches of ``batch_size``, reusing the loaded model."""
        outs = []
        for i in range(0, len(x), self.batch_size):
            outs.append(self.predict(x[i:i + self.batch_size]))
            if on_batch is not None:
                on_batch(min(self.batch_size, len(x) - i))
        return np.concatenate(outs) if outs else np.empty_like(x)

    def info(self) -> dict[str, Any]:
        return {}

    @property
    def label(self) -> str:
        """How messages name the model: its ``name`` when given, its file when it has one, else its engine."""
        if getattr(self, "name", None):
            return str(self.name)
        loaded = getattr(self, "loaded", None)
        model = getattr(self, "model", None)
        path = getattr(loaded, "path", None) or getattr(model, "path", None)
        return str(path) if path is not None else f"the {self.kind} model ({self.engine})"
