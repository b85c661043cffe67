"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from ..coreml.units import ComputeUnits
from ..export.config import WEIGHT_MODES
from ..quantize.config import BACKENDS


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A ``str`` Enum of ``values`` for a Typer option, built from the library's own list, so the
    option's choices, its help and the library's check cannot drift apart."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


#: Core ML weight storage of an ML Program (``tbopt run --package-weights``), as ``tbopt export --weights``.
WeightModeChoice = choices("WeightModeChoice", WEIGHT_MODES)
#: ... and of a NeuralNetwork ``.mlmodel`` (``tbopt run --weights``): every mode but int4, which only
#: an ML Program for iOS 18 stores.
ModelWeightModeChoice = choices("ModelWeightModeChoice", tuple(m for m in WEIGHT_MODES if m != "int4"))
#: The int8 engine (``--backend`` of ``tbopt quantize`` and ``tbopt run``).
BackendChoice = choices("BackendChoice", ("auto", *BACKENDS))

ArtifactArg = Annotated[
    Optional[Path],
    typer.Argument(help="Model file: a checkpoint (.pt), a tbopt artifact, int8 TorchScript, .mlmodel or "
                        ".mlpackage. Default: the bundled demo checkpoint.", show_default=False),
]
#: The model argument of the commands that take only float PyTorch models (prune, quantize).
FloatModelArg = Annotated[
    Optional[Path],
    typer.Argument(help="Float model: a checkpoint (.pt) or a tbopt artifact (e.g. from tbopt prune). "
                        "Default: the bundled demo checkpoint.", show_default=False),
]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the result.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON (and nothing else) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
ArchOpt = Annotated[
    Optional[str],
    typer.Option("--arch", help="Your own network instead of TinyBeauty: package.module:ClassName "
                                "(importable from the current environment).", rich_help_panel="Model"),
]
ArchKwargsOpt = Annotated[
    Optional[str],
    typer.Option("--arch-kwargs", help="JSON object of constructor arguments for --arch, e.g. '{\"width\": 16}'.",
                 rich_help_panel="Model"),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="DANGEROUS: allow checkpoints that need full unpickling, which can run "
                                        "arbitrary code. Only for files you made yourself.",
                 rich_help_panel="Model"),
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Folder of images, or of pairs (input/ + target/, or before/ + after/). "
                                "Default: the built-in synthetic test set (100 pairs).",
                 rich_help_panel="Data"),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", min=1, help="Use at most N images.", rich_help_panel="Data")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for PyTorch (default: all cores).", rich_help_panel="Timing"),
]


def model_options(arch: str | None, arch_kwargs: str | None, trust_pickle: bool) -> dict:
    return {"arch": arch, "arch_kwargs": arch_kwargs, "trust_pickle": trust_pickle}


ComputeUnitsOpt = Annotated[
    Optional[ComputeUnits],
    typer.Option("--compute-units", case_sensitive=False,
                 help="Core ML models on macOS: the processors Core ML may use (default: all). Off macOS, "
                      "Core ML models run in tbopt's reference executor on the CPU and this has no effect.",
                 rich_help_panel="Core ML"),
]
Fp16EmulationOpt = Annotated[
    bool,
    typer.Option("--fp16-emulation", help="Core ML models run by the reference executor (off macOS): round every "
                                          "fp16 value to fp16 after each op, as fp16 hardware does.",
                 rich_help_panel="Core ML"),
]


def coreml_options(compute_units: ComputeUnits | None, fp16_emulation: bool) -> dict:
    return {"compute_units": compute_units.value if compute_units is not None else None,
            "fp16_emulation": fp16_emulation}
