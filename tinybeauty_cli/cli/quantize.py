"""tbopt quantize: int8 static quantization into a self-contained TorchScript file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from ..quantize.config import SELECTION_RUNS, QuantizeConfig
from . import _imports, _output
from ._errors import handle_errors
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    QUANTIZE_CALIB_COUNT,
    BackendChoice,
    DataOpt,
    FloatModelArg,
    ForceOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    TrustPickleOpt,
    model_options,
    old_name,
    split_list,
)

if TYPE_CHECKING:
    from ..flow.quantize import QuantizeResult


@handle_errors
def quantize(
    artifact: FloatModelArg = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Folder of calibration photos (never the test set). Default: synthetic portraits.",
        rich_help_panel="Calibration")] = None,
    calib_count: Annotated[int, typer.Option(
        "--calib-count", min=1, help="Calibration images to use (tbopt export calibrates on 16: its figures were "
                                     "measured so).", rich_help_panel="Calibration")] = QUANTIZE_CALIB_COUNT,
    backend: Annotated[BackendChoice, typer.Option(  # type: ignore[valid-type]
        "--backend", case_sensitive=False, help="Quantized engine. auto times every engine this CPU supports "
                                                "and keeps the fastest that meets --min-fidelity.")] = BackendChoice("auto"),
    keep_float: Annotated[Optional[List[str]], typer.Option(
        "--keep-float", help="Layers to keep in float: auto (the fewest most sensitive layers needed to reach "
                             "--min-fidelity), none, or layer names (repeatable, or a comma list; a module name "
                             "keeps every layer under it). Default: auto.", show_default=False)] = None,
    min_fidelity: Annotated[float, typer.Option(
        "--min-fidelity", help="Fidelity floor (dB): the int8 model's PSNR against the float model.")] = 45.0,
    min_psnr: Annotated[Optional[float], typer.Option("--min-psnr", hidden=True,
                                                      help="Old name of --min-fidelity.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE", help="int8 TorchScript file to write. Default: ./<model>_int8.pt.",
        show_default=False)] = None,
    data: DataOpt = None,
    limit: LimitOpt = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="CPU threads the int8 file will run with: engines are ranked and latency is "
                                 "measured at them (default: all cores).", rich_help_panel="Timing")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """int8 static quantization, calibrated on real images, into a TorchScript file that runs without tbopt."""
    _imports.quantization()
    from ..flow.quantize import quantize_file as quantize_model  # noqa: PLC0415 - torch, only when the command runs

    out = _output.Output(json_mode=json_out, quiet=quiet)
    source = out.model_or_demo(artifact)
    min_fidelity = old_name(min_fidelity, 45.0, min_psnr, "--min-psnr", "--min-fidelity")
    cfg = QuantizeConfig(backend=backend.value, calib=calib, calib_count=calib_count,
                         keep_float=",".join(split_list(keep_float)) or "auto", min_psnr_db=min_fidelity, threads=threads, eval_limit=limit)
    target = output or Path(f"{Path(source).stem}_int8.pt")
    command = "tbopt " + " ".join(sys.argv[1:]) if sys.argv[1:] else "tbopt quantize"
    result = quantize_model(source, target, cfg, force=force, progress=out, command=command, data=data,
                            **model_options(arch, arch_kwargs, trust_pickle))
    out.emit(result, render_quantize)


def render_quantize(out: _output.Output, r: QuantizeResult) -> None:
    from ..core.load import load_text, overload_note  # noqa: PLC0415

    d = r.to_dict()
    size, quality, lat = d["size"], d["quality"], d["latency"]
    out.fields(f"tbopt quantize: {r.input} -> {r.output}", {
        "backend": f"{r.backend} ({r.backend_reason})",
        "layers": f"{len(r.quantized_layers)} int8, {len(r.float_layers)} float"
                  + (f" ({', '.join(r.float_layers)})" if r.float_layers else ""),
        "graph rewrites": "; ".join(r.rewrites.applied) or "none",
        "calibration": f"{d['calibration']['source']}, {d['timings'].get('calibration_s', 0):.1f} s",
    })
    out.table("result", ["", "float", "int8", "int8 / float"], [
        ("size on disk (KB)", _output.kb(size["float_bytes"]), _output.kb(size["int8_bytes"]), f"{size['ratio']:.3f}"),
        ("size zipped (KB)", _output.kb(size["float_zipped_bytes"]), _output.kb(size["int8_zipped_bytes"]),
         f"{size['zipped_ratio']:.3f}"),
        ("PSNR vs targets (dB)", quality["float_target_psnr_db"] or "-", quality["int8_target_psnr_db"] or "-",
         f"{-quality['target_psnr_drop_db']:+.3f} dB" if quality["target_psnr_drop_db"] is not None
         else "no targets"),
        ("fidelity vs float (dB)", "ref", quality["fidelity_psnr_db"], f"worst image {quality['worst_fidelity_db']:.2f}"),
        (f"latency p50 (ms, {lat['threads']} thr)", lat["float"]["p50_ms"], lat["int8"]["p50_ms"], f"{lat['ratio']:.3f}"),
    ], caption=f"{quality['images']}; latency: batch 1, {lat['size']}x{lat['size']}, median of "
               f"{lat['int8']['runs']} interleaved runs after {lat['int8']['warmup']} warm-up; "
               f"float = {lat['float_engine']}, int8 = {lat['int8_engine']}; {load_text(lat.get('load_average'))}",
              right=("float", "int8", "int8 / float"))
    if lat.get("int8_timed_with"):
        out.line(f"int8 latency {lat['int8']['p50_ms']} ms is timed with {lat['int8_timed_with']}; a plain Python "
                 f"process gets {lat.get('int8_plain_process_ms')} ms; for the faster one: {lat['faster_with']}")
    if any(layer.alone_fidelity_db is not None for layer in r.layers):
        out.table("layers (sensitivity: fidelity with only that layer in int8)",
                  ["layer", "type", "precision", "alone in int8 (dB)", "why"],
                  [(layer.name, layer.kind, "int8" if layer.quantized else "float", layer.alone_fidelity_db,
                    layer.reason) for layer in r.layers], right=("alone in int8 (dB)",))
    else:
        out.table("layers", ["layer", "type", "precision", "why"],
                  [(layer.name, layer.kind, "int8" if layer.quantized else "float", layer.reason)
                   for layer in r.layers])
    if len(r.backends) > 1:
        out.table(f"backends (fastest of {SELECTION_RUNS} interleaved runs, {r.ranking['threads']} thread(s); "
                  f"float model {r.ranking['float_ms']} ms)",
                  ["backend", "status", "all-int8 (ms)", "final (ms)", "fidelity (dB)", "kept float", "note"],
                  [(b.backend, b.status, b.all_int8_latency_ms, b.latency_ms, b.fidelity_db,
                    ", ".join(b.kept_float) or "-", b.note) for b in r.backends],
                  right=("all-int8 (ms)", "final (ms)", "fidelity (dB)"))
    t = d["timings"]
    out.line(f"time: {t['total_s']:.1f} s (calibration {t.get('calibration_s', 0):.1f} s, keep-float "
             f"{t.get('keep_float_s', 0):.1f} s, evaluation {t.get('evaluation_s', 0):.1f} s)")
    for n in r.notes:
        out.warn(n)
    if note := overload_note(lat.get("load_average")):
        out.line(note)
