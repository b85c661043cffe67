"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

import typer

from ..core.errors import UsageError
from ..coreml.units import ComputeUnits
from ..export.config import WEIGHT_MODES
from ..quantize.config import BACKENDS
from ..quantize.config import DEFAULT_CALIB_COUNT as QUANTIZE_CALIB_COUNT  # noqa: F401 - re-exported


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A ``str`` Enum of ``values`` for a Typer option, built from the library's own list, so the
    option's choices, its help and the library's check cannot drift apart."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def split_list(values: Iterable[str] | None) -> tuple[str, ...]:
    """A list option's values: every list option is repeatable and each value may also be a comma
    list (``--for ios13 --for cpu`` and ``--for ios13,cpu`` are the same); blanks are dropped, so
    ``--rates ''`` is an empty list."""
    return tuple(v.strip() for value in values or () for v in str(value).split(",") if v.strip())


def old_name(value: Any, default: Any, old: Any, old_flag: str, new_flag: str) -> Any:
    """The value of an option that also answers to a hidden old name: the old name's value if only it
    was given; both given with different values is a usage error."""
    if old is None:
        return value
    if value != default and value != old:
        raise UsageError(f"{old_flag} is the old name of {new_flag}; give one of them")
    return old


def pick(values: Iterable[str], allowed: Iterable[str], option: str) -> tuple[str, ...]:
    """``values`` matched case-insensitively against ``allowed`` (as every enum option is), in
    ``allowed``'s spelling; a value not among them is a usage error naming the choices."""
    by_lower = {a.lower(): a for a in allowed}
    out = []
    for v in values:
        if v.lower() not in by_lower:
            raise UsageError(f"{option} must be one of {', '.join(by_lower.values())}, got {v!r}")
        out.append(by_lower[v.lower()])
    return tuple(out)


def readable_metavars(command: Any) -> None:
    """Give every option of ``command`` a plain metavar (``DIR``, ``N``, ``fp16|int8``, none for a
    flag) unless it declares one, so --help reads the same whatever Typer prints by default
    (Typer 0.2x prints ``<bool>``, ``<path>``, ``<list[str]>``)."""
    get_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:  # built when help is shown, not among the params
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for param in getattr(command, "params", ()):
        if getattr(param, "param_type_name", "") != "option" or param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        choices, kind = _type_of(param)
        if choices:
            param.metavar = "|".join(str(getattr(c, "value", c)) for c in choices)
        else:
            param.metavar = METAVARS.get(param.opts[0]) or {int: "N", float: "NUMBER", Path: "PATH"}.get(kind, "TEXT")


def _type_of(param: Any) -> tuple[tuple | None, Any]:
    """(choices or None, Python type) of an option, from Typer's type descriptor (Typer >= 0.2x,
    which vendors click) or click's ParamType (earlier Typer)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is not None:
        return (tuple(desc.choices) if desc.is_choice else None), desc.annotation
    t = param.type
    name = getattr(t, "name", "")
    kind = int if name.startswith("integer") else float if name.startswith("float") else Path if name == "path" else str
    return (tuple(t.choices) if getattr(t, "choices", None) else None), kind


#: Metavars that say more than the type: folders and files, decibels, rates.
METAVARS = {
    "--data": "DIR", "--calib": "DIR", "--ref": "MODEL", "--csv": "FILE", "--markdown": "FILE",
    "--min-fidelity": "DB", "--min-psnr": "DB", "--max-drop": "DB", "--rate": "RATE", "--time-budget": "MIN",
    "--arch": "MODULE:CLASS", "--arch-kwargs": "JSON", "--exclude": "LAYER", "--group-rate": "LAYER=RATE",
    "--keep-float": "auto|none|LAYER", "--rates": "RATE", "--full-res-rates": "RATE", "--sparsities": "SHARE",
    "--finetune-steps": "N", "--palettes": "palN", "--seed": "N",
}


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
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
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
    typer.Option("--data", "-d", help="Folder of images, or of pairs (input/ + target/, or before/ + after/). "
                                "Default: the built-in synthetic test set (100 pairs).",
                 rich_help_panel="Data"),
]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", "-n", min=1, help="Use at most N images.", rich_help_panel="Data")]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for PyTorch (default: all cores).", rich_help_panel="Timing"),
]


#: Latency: timed runs and untimed warm-up runs, the same in every command that times.
DEFAULT_RUNS = 30
DEFAULT_WARMUP = 5
RunsOpt = Annotated[int, typer.Option("--runs", min=1, help="Timed runs per model (batch 1); the latency is their "
                                                           "median.", rich_help_panel="Timing")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up runs before timing.",
                                        rich_help_panel="Timing")]
NoTimingOpt = Annotated[bool, typer.Option("--no-timing", help="Skip latency measurement.", rich_help_panel="Timing")]


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
