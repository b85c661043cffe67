"""A command's heavy imports, done in order before its work begins.

An interrupt during an import must end the command. Imported lazily in the middle of the work,
some are not ended by it but broken: PyTorch's C extension imports numpy as it initialises and
goes on if that fails; C++ that calls back into Python (fx tracing for quantization, an
optimizer's first step, FLOP counting) imports ``torch._dynamo`` there; coremltools imports its
optional dependencies under a bare ``except:``. An interrupt in one of those imports is dropped
and leaves a half-imported module behind (``module 'torch._dynamo' has no attribute 'guards'``
later). Imported here, from plain Python and each dependency before what imports it, an
interrupt simply ends the command (exit 130). ``core.interrupts`` is the net for any that remain.

Each command calls the one function that covers what it runs, first thing (inside
``handle_errors``, where an interrupt ends the command); ``tbopt --help`` imports none of this.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Iterable, Optional

#: Files opened through coremltools (``runtime.runners.OPENERS`` reads them; its module imports torch).
_COREML_SUFFIXES = (".mlmodel", ".mlpackage")


def numerics() -> None:
    """numpy (before torch: see the module docstring), torch, Pillow's image formats."""
    import numpy  # noqa: F401, PLC0415
    import numpy.random  # noqa: F401, PLC0415 - imported on first use by synthetic images
    import torch  # noqa: F401, PLC0415
    from PIL import Image  # noqa: PLC0415

    Image.init()  # the format plugins Pillow otherwise imports on the first file it opens


def compiler() -> None:
    """:func:`numerics` and what torch imports lazily from C++: its compiler stack (``torch._dynamo``,
    ``torch._inductor``, sympy through symbolic shapes) and the FLOP counter."""
    numerics()
    import torch._dynamo  # noqa: F401, PLC0415
    import torch._inductor  # noqa: F401, PLC0415
    import torch.fx.experimental.symbolic_shapes  # noqa: F401, PLC0415
    import torch.utils.flop_counter  # noqa: F401, PLC0415


def quantization() -> None:
    """:func:`compiler` and torch's FX quantization."""
    compiler()
    import torch.ao.quantization.quantize_fx  # noqa: F401, PLC0415


def pruning() -> None:
    """:func:`compiler` and torch-pruning."""
    compiler()
    import torch_pruning  # noqa: F401, PLC0415


def coreml() -> None:
    """:func:`compiler`, the optional dependencies coremltools tries under a bare ``except:`` that are
    installed, then coremltools itself (quietly, as ``coreml.spec`` imports it)."""
    compiler()
    _coremltools_optional()
    from ..coreml.spec import coremltools  # noqa: PLC0415

    coremltools()


def _coremltools_optional() -> None:
    """The optional dependencies coremltools tries, each where it is installed (ImportError only:
    an interrupt still ends the command)."""
    with suppress(ImportError):
        import scipy.optimize  # noqa: F401, PLC0415
        import scipy.sparse  # noqa: F401, PLC0415
        import scipy.stats  # noqa: F401, PLC0415
    with suppress(ImportError):
        import sklearn  # noqa: F401, PLC0415
    with suppress(ImportError):
        import torchvision  # noqa: F401, PLC0415
    with suppress(ImportError):
        import torchao  # noqa: F401, PLC0415


def everything() -> None:
    """What ``tbopt run`` and ``tbopt optimize`` use: every stage's imports."""
    quantization()
    pruning()
    coreml()


def for_files(paths: Iterable[Optional[Path | str]], *, counts: bool = True) -> None:
    """:func:`coreml` when one of ``paths`` is a Core ML file, else :func:`compiler` (``counts``: the
    command counts MACs, which imports the compiler stack) or :func:`numerics`."""
    if any(p is not None and Path(p).suffix.lower() in _COREML_SUFFIXES for p in paths):
        coreml()
    elif counts:
        compiler()
    else:
        numerics()
