"""tbopt compare: two artifacts on the same images, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import _output
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
    from ..measure.compare import CompareResult


@handle_errors
def compare(
    a: Annotated[Path, typer.Argument(help="First artifact (any kind tbopt reads).")],
    b: Annotated[Path, typer.Argument(help="Second artifact (any kind tbopt reads).")],
    data: DataOpt = None,
    limit: LimitOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="DIR", show_default=False,
        help="Folder for a PNG of the least similar images (<A>_vs_<B>.png). Default: no picture.")] = None,
    worst: Annotated[int, typer.Option("--worst", min=1, help="How many of the least similar images to show.")] = 3,
    runs: RunsOpt = DEFAULT_RUNS,
    warmup: WarmupOpt = DEFAULT_WARMUP,
    threads: ThreadsOpt = None,
    no_timing: NoTimingOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    compute_units: ComputeUnitsOpt = None,
    fp16_emulation: Fp16EmulationOpt = False,
) -> None:
    """Both artifacts on the same images: output PSNR between them, each vs targets, size and speed ratios, weights."""
    from ..measure.compare import CompareConfig  # noqa: PLC0415 - torch
    from ..measure.compare import compare as run_compare

    out = _output.Output(json_mode=json_out, quiet=quiet)
    cfg = CompareConfig(data=data, limit=limit, runs=runs, warmup=warmup, threads=threads, worst=worst)
    result = run_compare(a, b, cfg, out_dir=out_dir, force=force, time_models=not no_timing, progress=out,
                         **model_options(arch, arch_kwargs, trust_pickle),
                         **coreml_options(compute_units, fp16_emulation))
    out.emit(result, render_compare)


def render_compare(out: _output.Output, result: CompareResult) -> None:
    sa, sb = result.a, result.b

    def lat(side):
        return "-" if side.latency is None else f"{side.latency.p50_ms:.2f}"

    from ..core.load import highest, load_text, overload_note  # noqa: PLC0415

    load = highest((sa.latency, sb.latency))
    out.table(f"tbopt compare ({result.data_source})", ["", "A", "B", "B / A"], [
        ("file", sa.path, sb.path, ""),
        ("engine", sa.engine, sb.engine, ""),
        ("size on disk (KB)", _output.kb(sa.size_bytes), _output.kb(sb.size_bytes), f"{result.size_ratio:.3f}"),
        ("zipped (KB)", _output.kb(sa.zipped_bytes), _output.kb(sb.zipped_bytes),
         f"{sb.zipped_bytes / sa.zipped_bytes:.3f}"),
        ("PSNR vs targets (dB)", sa.target_psnr_db, sb.target_psnr_db, ""),
        ("latency p50 (ms)", lat(sa), lat(sb), "-" if result.latency_ratio is None else f"{result.latency_ratio:.3f}"),
    ], caption=None if sa.latency is None else f"latency: batch 1, {sa.latency.threads} thread(s), median of "
                                               f"{sa.latency.runs} runs after {sa.latency.warmup} warm-up, "
                                               f"{load_text(load)}")
    out.fields(None, {
        "PSNR between outputs": f"{result.psnr_between_mean_db:.2f} dB mean, {result.psnr_between_worst_db:.2f} dB "
                                f"worst ({result.worst_images[0]})",
        "max |A - B|": f"{result.max_abs_diff_levels:.2f} 8-bit levels",
        "figure": result.figure or "none (-o DIR writes one)",
    })
    if result.layers:
        changed = [l for l in result.layers if l.rel_l2 is None or l.rel_l2 > 0]
        out.table(f"weights: {len(changed)} of {len(result.layers)} tensors differ",
                  ["tensor", "shape A", "shape B", "max |diff|", "rel. L2", "changed"],
                  [(l.name, _shape(l.shape_a), _shape(l.shape_b),
                    "-" if l.max_abs is None else f"{l.max_abs:.3g}",
                    "-" if l.rel_l2 is None else f"{l.rel_l2:.3g}",
                    "-" if l.changed_fraction is None else f"{100 * l.changed_fraction:.1f}%") for l in changed],
                  right=("max |diff|", "rel. L2", "changed"))
    for n in result.notes:
        out.line(n)
    if note := overload_note(load):
        out.line(note)


def _shape(s) -> str:
    return "-" if s is None else "x".join(map(str, s))
