"""PyTorch runners, and the one table that says which opener reads a file.

:func:`open_runner` opens any artifact tbopt knows behind the :class:`~tinybeauty_cli.core.runner.Runner`
interface: checkpoints, tbopt artifacts and TorchScript here, Core ML files through ``coreml.runner``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core import contexts
from ..core.artifact import Preprocessing
from ..core.checkpoint import LoadedModel, load_model
from ..core.errors import UnsupportedError
from ..core.runner import Runner


@dataclass
class TorchRunner(Runner):
    """A PyTorch module returning a residual (float checkpoints, or TorchScript).

    An int8 module runs with ``torch.backends.quantized.engine`` borrowed for the engine its
    weights were packed for (``quantized_engine``), and the global setting restored after.
    """

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    kind: str = "float"
    engine: str = "PyTorch eager fp32"
    batch_size: int = 8
    loaded: LoadedModel | None = None
    quantized_engine: str | None = None  # e.g. "x86"; None for float modules
    name: str | None = None  # how messages name a module in memory (default: its file, else its engine)

    def residual(self, x: np.ndarray) -> np.ndarray:
        borrow = (contexts.quantized_engine(self.quantized_engine) if self.quantized_engine
                  else contextlib.nullcontext())
        with borrow, torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        out = out.float().numpy()
        if self.preprocessing.output == "image":
            return out - x
        return out


def runner_for(loaded: LoadedModel) -> Runner:
    """The runner for a model :func:`~tinybeauty_cli.checkpoint.load_model` opened."""
    if loaded.kind == "float":
        return TorchRunner(loaded.module, loaded.preprocessing, loaded=loaded)
    if loaded.kind == "torchscript":
        meta = loaded.metadata
        kind = "int8" if meta.get("quantized") else "float"
        engine = meta.get("engine") or ("PyTorch TorchScript")
        return TorchRunner(loaded.module, loaded.preprocessing, kind=kind, engine=engine, loaded=loaded,
                           quantized_engine=loaded.quantized_engine)
    raise UnsupportedError(f"no runner for a {loaded.kind} model")  # pragma: no cover


def open_runner(path: Path | str, **options: Any) -> Runner:
    """Open any artifact tbopt knows as a :class:`Runner`.

    ``options`` are passed to the opener: ``arch``, ``arch_kwargs``, ``trust_pickle``
    for checkpoints; Core ML openers take their own (``compute_units``, ``fp16_emulation``);
    ``check=False`` (both) keeps a model whose weights or test output hold NaN or Inf, with the
    problem in its ``problems`` (for ``tbopt info``; every other command refuses it).
    Each opener ignores the others' options, so one set of options serves a mix of files
    (``tbopt bench a.pt b.mlpackage --compute-units cpu``).
    """
    path = Path(path)
    opener = OPENERS.get(path.suffix.lower(), open_checkpoint_runner)
    return opener(path, **options)


def open_checkpoint_runner(path: Path, **options: Any) -> Runner:
    """A checkpoint, tbopt artifact or TorchScript file, opened by :func:`load_model`."""
    ckpt_opts = {k: options[k] for k in ("arch", "arch_kwargs", "trust_pickle", "check") if k in options}
    return runner_for(load_model(path, **ckpt_opts))


def open_coreml(path: Path, **options: Any) -> Runner:
    """A ``.mlpackage`` / ``.mlmodel``; coremltools is imported only when one is opened."""
    from ..coreml.runner import open_coreml_runner  # noqa: PLC0415 - heavy, and only for Core ML files

    return open_coreml_runner(path, **options)


#: Which opener reads a file, by suffix; anything else is a checkpoint, an artifact or TorchScript.
OPENERS: dict[str, Callable[..., Runner]] = {".mlpackage": open_coreml, ".mlmodel": open_coreml}
