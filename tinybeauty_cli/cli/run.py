"""tbopt run: original -> pruned -> int8 -> Core ML into one folder, with the measured table and picture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..core.errors import UsageError
from ..flow.run_config import OUTPUT_FILES, RunConfig
from ..prune.config import PruneMethod
from . import _imports, _output
from ._errors import handle_errors
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    QUANTIZE_CALIB_COUNT,
    BackendChoice,
    DataOpt,
    ForceOpt,
    JsonOpt,
    LimitOpt,
    ModelWeightModeChoice,
    QuietOpt,
    RunsOpt,
    ThreadsOpt,
    TrustPickleOpt,
    WarmupOpt,
    WeightModeChoice,
    old_name,
)

DEFAULT_OUTPUT = Path("optimized_model")

if TYPE_CHECKING:
    from ..flow.pipeline import RunResult


@handle_errors
def run(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="Float checkpoint or tbopt artifact to optimize. Default: the bundled demo checkpoint.",
        show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="DIR", help="Folder for every output (made if missing).",
        show_default=str(DEFAULT_OUTPUT))] = None,
    out_old: Annotated[Optional[Path], typer.Option("--out", hidden=True, help="Old name of --output.")] = None,
    rate: Annotated[float, typer.Option("--rate", "-r", help="Pruning rate, in [0, 1).")] = 0.3,
    method: Annotated[PruneMethod, typer.Option(
        "--method", "-m", case_sensitive=False, help="Pruning method: magnitude (the original plan's per-layer rule) or global zero "
                               "weights (smaller zipped); channel removes channels (smaller and faster, fine-tunes "
                               "longer).")] = PruneMethod.magnitude,
    finetune_steps: Annotated[Optional[int], typer.Option(
        "--finetune-steps", min=0, show_default=False,
        help="Distillation steps after pruning (default: the method's, see tbopt prune --help).")] = None,
    weights: Annotated[ModelWeightModeChoice, typer.Option(  # type: ignore[valid-type]
        "--weights", case_sensitive=False,
        help="Weight storage in TinyBeauty.mlmodel (as tbopt export --weights). int8 by default, as tbopt "
             "export: the plan's file is an int8 .mlmodel under 100 KB.")
    ] = ModelWeightModeChoice("int8"),  # type: ignore[valid-type]
    package_weights: Annotated[Optional[WeightModeChoice], typer.Option(  # type: ignore[valid-type]
        "--package-weights", show_default=False, case_sensitive=False,
        help="Weight storage in TinyBeauty.mlpackage (default: as --weights).")] = None,
    data: DataOpt = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Folder of unlabeled images for channel ranking, distillation and int8 calibration. "
                        "Default: synthetic portraits, never the test set.", rich_help_panel="Data")] = None,
    limit: LimitOpt = None,
    calib_count: Annotated[int, typer.Option("--calib-count", min=1, help="int8 calibration images (as tbopt "
                                             "quantize; tbopt export calibrates on 16).", rich_help_panel="Data")
                           ] = QUANTIZE_CALIB_COUNT,
    backend: Annotated[BackendChoice, typer.Option(  # type: ignore[valid-type]
        "--backend", case_sensitive=False, help="int8 engine (auto: the fastest that keeps fidelity).")] = BackendChoice("auto"),
    min_fidelity: Annotated[float, typer.Option(
        "--min-fidelity", help="Fidelity floor (dB): the int8 model's PSNR against the pruned float model "
                               "(layers stay float until it is met). Higher than tbopt quantize's 45: int8 noise adds "
                               "to the model's own error.")] = 50.0,
    min_psnr: Annotated[Optional[float], typer.Option("--min-psnr", hidden=True,
                                                      help="Old name of --min-fidelity.")] = None,
    runs: RunsOpt = DEFAULT_RUNS,
    warmup: WarmupOpt = DEFAULT_WARMUP,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Prune, quantize to int8 and export to Core ML, then measure every stage on the same images.

    Writes tinybeauty_pruned.pt, tinybeauty_optimized.pt (int8), TinyBeauty.mlmodel (iOS 13+), TinyBeauty.mlpackage, optimization_results.png, results.json and results.md into --output.
    """
    _imports.everything()
    from ..flow.pipeline import run_pipeline  # noqa: PLC0415 - torch and coremltools, only when the command runs

    ui = _output.Output(json_mode=json_out, quiet=quiet)
    if output is not None and out_old is not None and output != out_old:
        raise UsageError("--out is the old name of --output; give one of them")
    out = output or out_old or DEFAULT_OUTPUT
    min_fidelity = old_name(min_fidelity, 50.0, min_psnr, "--min-psnr", "--min-fidelity")
    cfg = RunConfig(rate=rate, method=method.value, finetune_steps=finetune_steps, weights=weights.value,
                    package_weights=package_weights.value if package_weights else None, data=data, calib=calib,
                    limit=limit, runs=runs, threads=threads, calib_count=calib_count, backend=backend.value,
                    min_psnr_db=min_fidelity, warmup=warmup, arch=arch,
                    arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    path = ui.model_or_demo(checkpoint)

    def on_stage(number: int, total: int, name: str) -> None:
        ui.note(f"[{number}/{total}] {STAGE_TEXT[name]}")

    result = run_pipeline(path, out, cfg, force=force, progress=ui, on_stage=on_stage)
    ui.emit(result, render_run)


STAGE_TEXT = {
    "prune": "pruning the original -> " + OUTPUT_FILES["pruned"],
    "quantize": "quantizing the pruned model to int8 -> " + OUTPUT_FILES["quantized"],
    "export": f"exporting the pruned model to Core ML -> {OUTPUT_FILES['mlmodel']}, {OUTPUT_FILES['mlpackage']}",
    "measure": "measuring every stage on the same images (size, PSNR, latency)",
    "report": f"writing {OUTPUT_FILES['json']}, {OUTPUT_FILES['markdown']}, {OUTPUT_FILES['figure']}",
}


def render_run(ui: _output.Output, r: RunResult) -> None:
    from ..flow.pipeline import caption  # noqa: PLC0415 - torch
    from ..measure.report import format_figure  # noqa: PLC0415 - numpy

    rows = [(s.stage, s.artifact, _output.kb(s.size_bytes), _output.kb(s.zipped_bytes),
             *(format_figure(v) for v in (s.target_psnr_db, s.fidelity_psnr_db, s.latency_ms)), s.engine)
            for s in r.stages]
    heads = ["Stage", "Artifact", "Size (KB)", "Zipped (KB)", "PSNR (dB)", "Fidelity (dB)", "Inference time (ms)",
             "Engine"]
    ui.table(f"tbopt run: {Path(r.checkpoint).name} -> {r.out}/", heads, rows, caption=caption(r),
             right=heads[2:7])
    checks = r.checks()
    lines = [f"TinyBeauty.mlmodel: {checks['mlmodel_bytes']:,} bytes "
             f"({'under' if checks['mlmodel_under_100kb'] else 'NOT under'} 100 KB)"]
    if "psnr_drop_db" in checks:
        drops = ", ".join(f"{k} {v:+.2f}" for k, v in checks["psnr_drop_db"].items())
        lines.append(f"PSNR drop vs the original (dB): {drops} "
                     f"({'all within' if checks['psnr_within_0p3_db'] else 'NOT all within'} 0.3 dB)")
    else:
        lines.append("the images have no targets: quality is fidelity to the original model only")
    s = r.seconds
    lines.append("time: " + ", ".join(f"{k} {s[k]:.1f} s" for k in ("prune", "quantize", "export", "measure",
                                                                       "report", "total") if k in s))
    lines.append(f"wrote {r.out}/: " + ", ".join(Path(p).name for p in r.files.values()))
    for line in lines:
        ui.line(line)
    for n in r.notes:
        ui.note(n)
