"""tbopt apply: make up photos with a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from . import _output
from ._errors import handle_errors
from ._notes import warn_runner_notes
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    ComputeUnitsOpt,
    ForceOpt,
    Fp16EmulationOpt,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    TrustPickleOpt,
    coreml_options,
    model_options,
)


@handle_errors
def apply(
    artifact: Annotated[Path, typer.Argument(help="Model file (checkpoint, tbopt artifact, int8 TorchScript, "
                                                  ".mlmodel, .mlpackage), or 'demo' for the bundled demo.")],
    images: Annotated[List[Path], typer.Argument(help="Photos to make up.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Folder for the made-up images (<name>.png).")],
    model_size: Annotated[bool, typer.Option("--model-size", help="Write the model-size image of the centre "
                                             "square instead of adding the residual at full resolution.")] = False,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    compute_units: ComputeUnitsOpt = None,
    fp16_emulation: Fp16EmulationOpt = False,
) -> None:
    """Write made-up versions of photos: the residual is added at full resolution, as the authors' demo does."""
    from ..core.contexts import torch_threads  # noqa: PLC0415 - torch
    from ..flow.apply import apply_makeup  # noqa: PLC0415 - torch, only when the command runs
    from ..runtime.runners import open_runner  # noqa: PLC0415

    out = _output.Output(json_mode=json_out, quiet=quiet)
    path = out.model_or_demo(None) if str(artifact) == "demo" else artifact
    runner = open_runner(path, **model_options(arch, arch_kwargs, trust_pickle),
                         **coreml_options(compute_units, fp16_emulation))
    warn_runner_notes(out, [runner], compute_units is not None, fp16_emulation)
    with torch_threads(threads):
        results = apply_makeup(runner, list(images), out_dir, model_size=model_size, force=force, progress=out)
    out.emit({"model": str(path), "engine": runner.engine, "images": results}, render_apply)


def render_apply(out: _output.Output, d: dict) -> None:
    out.table(f"made up with {Path(d['model']).name} ({d['engine']})",
              ["input", "output", "size", "mean |change|", "PSNR vs input (dB)"],
              [(r.input, r.output, f"{r.width}x{r.height}", f"{r.mean_abs_change:.2f}", r.psnr_vs_input_db)
               for r in d["images"]], right=("mean |change|", "PSNR vs input (dB)"))
