"""Every artifact kind behind one interface: ``predict(batch) -> made-up images``.

A batch is float32 (N, 3, S, S) in [-1, 1] at the model's size. ``residual`` is what
the network adds; ``predict`` is ``clamp(x + residual, -1, 1)``, the made-up face.
Commands that score, time or apply models (``apply``, ``bench``, ``compare``, ``run``)
only see this interface, so Core ML files and int8 TorchScript work like checkpoints.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.checkpoint import LoadedModel, Preprocessing, load_model
from ..core.errors import UnsupportedError


class Runner:
    """Base class: subclasses implement :meth:`residual` (and may override :meth:`predict`)."""

    #: "float" | "int8" | "coreml"
    kind: str = "float"
    #: How the numbers are computed, e.g. "PyTorch eager fp32".
    engine: str = ""
    preprocessing: Preprocessing = Preprocessing()
    batch_size: int = 8

    @property
    def size(self) -> int:
        return self.preprocessing.size

    def residual(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x + self.residual(x), -1.0, 1.0)

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


@dataclass
class TorchRunner(Runner):
    """A PyTorch module returning a residual (float checkpoints, or TorchScript)."""

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    kind: str = "float"
    engine: str = "PyTorch eager fp32"
    batch_size: int = 8
    loaded: LoadedModel | None = None

    def residual(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        out = out.float().numpy()
        if self.preprocessing.output == "image":
            return out - x
        return out


#: Openers for other artifact kinds, by file suffix (registered by their modules).
_SUFFIX_OPENERS: dict[str, Callable[..., Runner]] = {}
#: Modules that register openers, imported on first use (they pull in heavy libraries).
_LAZY_OPENERS: dict[str, str] = {".mlpackage": "tinybeauty_cli.coreml.runner",
                                 ".mlmodel": "tinybeauty_cli.coreml.runner"}


def register_opener(suffix: str, opener: Callable[..., Runner]) -> None:
    _SUFFIX_OPENERS[suffix.lower()] = opener


def runner_for(loaded: LoadedModel) -> Runner:
    """The runner for a model :func:`~tinybeauty_cli.checkpoint.load_model` opened."""
    if loaded.kind == "float":
        return TorchRunner(loaded.module, loaded.preprocessing, loaded=loaded)
    if loaded.kind == "torchscript":
        meta = loaded.metadata
        kind = "int8" if meta.get("quantized") else "float"
        engine = meta.get("engine") or ("PyTorch TorchScript")
        return TorchRunner(loaded.module, loaded.preprocessing, kind=kind, engine=engine, loaded=loaded)
    raise UnsupportedError(f"no runner for a {loaded.kind} model")  # pragma: no cover


def open_runner(path: Path | str, **options: Any) -> Runner:
    """Open any artifact tbopt knows as a :class:`Runner`.

    ``options`` are passed to the opener: ``arch``, ``arch_kwargs``, ``trust_pickle``
    for checkpoints; Core ML openers take their own (``compute_units``, ``fp16_emulation``).
    Each opener ignores the others' options, so one set of options serves a mix of files
    (``tbopt bench a.pt b.mlpackage --compute-units cpu``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUFFIX_OPENERS and suffix in _LAZY_OPENERS:
        importlib.import_module(_LAZY_OPENERS[suffix])
    opener = _SUFFIX_OPENERS.get(suffix)
    if opener is not None:
        return opener(path, **options)
    ckpt_opts = {k: options[k] for k in ("arch", "arch_kwargs", "trust_pickle") if k in options}
    return runner_for(load_model(path, **ckpt_opts))
