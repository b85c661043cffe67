"""tbopt bench: the table users came for -- size, PSNR and latency per artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from . import _imports, _output
from ._errors import handle_errors
from ._options import (
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    NoTimingOpt,
    RunsOpt,
    WarmupOpt,
    ArchKwargsOpt,
    ArchOpt,
    ComputeUnitsOpt,
    DataOpt,
    ForceOpt,
    Fp16EmulationOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    ThreadsOpt,
    TrustPickleOpt,
    coreml_options,
    model_options,
)

if TYPE_CHECKING:
    from ..measure.bench import BenchResult


@handle_errors
def bench(
    artifacts: Annotated[Optional[List[Path]], typer.Argument(
        help="Any mix of checkpoints, tbopt artifacts, int8 TorchScript, .mlmodel and .mlpackage files. "
             "Default: the demo checkpoint.", show_default=False)] = None,
    data: DataOpt = None,
    limit: LimitOpt = None,
    ref: Annotated[Optional[Path], typer.Option("--ref", help="Reference for fidelity PSNR and SSIM "
                                                "(default: the first artifact).")] = None,
    runs: RunsOpt = DEFAULT_RUNS,
    warmup: WarmupOpt = DEFAULT_WARMUP,
    threads: ThreadsOpt = None,
    no_timing: NoTimingOpt = False,
    json_out: JsonOpt = False,
    csv_file: Annotated[Optional[Path], typer.Option("--csv", metavar="FILE", help="Also write the rows as CSV to this file.")] = None,
    markdown_file: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the table as Markdown "
                                                         "to this file.")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    compute_units: ComputeUnitsOpt = None,
    fp16_emulation: Fp16EmulationOpt = False,
) -> None:
    """Size (KB, on disk and zipped), PSNR, fidelity, SSIM and latency of each artifact on the same images."""
    _imports.for_files([*(artifacts or []), ref])
    from ..core.files import atomic_output, check_output  # noqa: PLC0415
    from ..measure.bench import BenchConfig, to_csv, to_markdown  # noqa: PLC0415 - torch
    from ..measure.bench import bench as run_bench

    out = _output.Output(json_mode=json_out, quiet=quiet)
    for f in (csv_file, markdown_file):
        if f is not None:
            check_output(f, force)
    cfg = BenchConfig(data=data, limit=limit, runs=runs, warmup=warmup, threads=threads)
    paths = list(artifacts) if artifacts else [out.model_or_demo(None)]
    result = run_bench(paths, cfg, ref=ref, time_models=not no_timing, progress=out,
                       **model_options(arch, arch_kwargs, trust_pickle),
                         **coreml_options(compute_units, fp16_emulation))
    if csv_file is not None:
        with atomic_output(csv_file, force=force) as tmp:
            tmp.write_text(to_csv(result))
    if markdown_file is not None:
        with atomic_output(markdown_file, force=force) as tmp:
            tmp.write_text(to_markdown(result))
    out.emit(result, render_bench)


def render_bench(out: _output.Output, result: BenchResult) -> None:
    from ..core.load import highest, load_text, overload_note  # noqa: PLC0415
    from ..measure.bench import columns, row_cells  # noqa: PLC0415 - torch

    cols = columns(result)
    heads = [c for c, _ in cols]
    cfg = result.config
    caption = (f"{result.data_source}; fidelity/SSIM vs {Path(result.reference).name}; latency: batch 1, "
               f"{cfg.effective_threads} thread(s), median of {cfg.runs} runs after {cfg.warmup} warm-up, "
               f"{load_text(highest(r.latency for r in result.rows))}"
               + ("; p50 with freed memory kept, plain p50 in a plain Python process (int8)"
                  if result.plain_process_rows else ""))
    out.table("tbopt bench", heads, [row_cells(r, cols) for r in result.rows], caption=caption, right=heads[2:])
    for n in result.notes:
        out.line(n)
    if note := result.plain_process_note():
        out.line(note)
    if note := overload_note(highest(r.latency for r in result.rows)):
        out.line(note)
