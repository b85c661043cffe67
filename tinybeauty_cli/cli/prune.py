"""tbopt prune: magnitude (per layer or global) or channel pruning, with optional distillation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from ..core.errors import UsageError
from ..prune.config import DEFAULT_CHANNEL_FINETUNE_STEPS, PruneConfig, PruneMethod
from . import _imports, _output
from ._errors import handle_errors
from ._options import (
    ArchKwargsOpt,
    ArchOpt,
    DataOpt,
    FloatModelArg,
    ForceOpt,
    JsonOpt,
    LimitOpt,
    QuietOpt,
    ThreadsOpt,
    TrustPickleOpt,
    model_options,
    split_list,
)

if TYPE_CHECKING:
    from ..prune.report import PruneReport


@handle_errors
def prune(
    artifact: FloatModelArg = None,
    rate: Annotated[float, typer.Option("--rate", "-r", help="Fraction to remove, in [0, 1): of each layer's weights "
                                        "(magnitude), of all conv weights (global), of each channel group (channel).",
                                        show_default=False)] = ...,  # type: ignore[assignment]
    method: Annotated[PruneMethod, typer.Option(
        "--method", "-m", case_sensitive=False, help="magnitude: zero each layer's smallest weights; global: one threshold over all "
                               "layers; channel: remove whole channels (smaller and faster).")] = PruneMethod.magnitude,
    finetune_steps: Annotated[Optional[int], typer.Option(
        "--finetune-steps", min=0, show_default=False,
        help=f"Distillation steps after pruning (teacher: the input model). Default: 0 for magnitude and global, "
             f"{DEFAULT_CHANNEL_FINETUNE_STEPS} for channel.")] = None,
    continue_from: Annotated[Optional[Path], typer.Option(
        "--continue-from", help="The same pruning of this checkpoint with a shorter distillation (a tbopt prune "
                                "output): continue its distillation to --finetune-steps (steps, learning rate and "
                                "batches where a run of that length would be) instead of starting afresh.",
        show_default=False)] = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="Folder of unlabeled images for channel ranking and fine-tuning (of pairs, only the inputs "
                        "are used). Default: synthetic portraits, never the test set.", rich_help_panel="Data")] = None,
    exclude: Annotated[Optional[List[str]], typer.Option(
        "--exclude", "-x", help="Conv layer to leave alone: a module name, a parent module, or a glob "
                                "(e.g. 'upconv*'). Repeatable, or a comma list.", show_default=False)] = None,
    group_rate: Annotated[Optional[List[str]], typer.Option(
        "--group-rate", help="--method channel: another rate for the channel group a conv produces, LAYER=RATE "
                             "(a module name, a parent module or a glob; e.g. 'upconv2=0.66'). Repeatable, or a comma list.",
        show_default=False)] = None,
    data: DataOpt = None,
    eval_data: Annotated[Optional[Path], typer.Option(
        "--eval-data", hidden=True, help="Old name of --data (the images scored).")] = None,
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of fine-tuning (same seed, same threads: same model).")] = 0,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="FILE", help="Artifact to write. Default: ./<model>_pruned-<method>-<percent>.pt.",
        show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Prune a model's convolutions (unstructured, or whole channels), fine-tune it by distillation and score it.

    Writes a tbopt artifact (default ./<name>_pruned-<method>-<percent>.pt) with the step in its history.
    """
    _imports.pruning()
    from ..flow.prune import prune_file as prune_model  # noqa: PLC0415 - torch, only when the command runs

    out = _output.Output(json_mode=json_out, quiet=quiet)
    if data is not None and eval_data is not None and data != eval_data:
        raise UsageError("--eval-data is the old name of --data (the images scored); give one of them")
    data = data or eval_data
    cfg = PruneConfig(rate=rate, method=method.value, finetune_steps=finetune_steps, exclude=split_list(exclude),
                      seed=seed, group_rates=split_list(group_rate))
    if data is not None and calib is None and cfg.any_pruning and (cfg.steps > 0 or method == PruneMethod.channel):
        # --data named the fine-tuning images before it named, as in every command, the images scored.
        out.note(f"Note: --data {data} is scored; channel ranking and fine-tuning use --calib "
                 "(default: synthetic portraits)")
    path = out.model_or_demo(artifact)
    report = prune_model(path, cfg, output=output, force=force, data=calib, eval_data=data, eval_limit=limit,
                         threads=threads, progress=out, continue_from=continue_from,
                         **model_options(arch, arch_kwargs, trust_pickle))
    out.emit(report, render_prune)


def render_prune(out: _output.Output, r: PruneReport) -> None:
    cfg = r.config
    structured = cfg.method == PruneMethod.channel.value
    rows = []
    for layer in r.layers:
        shape = _shape(layer.shape_before)
        if layer.shape_after != layer.shape_before:
            shape += f" -> {_shape(layer.shape_after)}"
        rows.append((layer.name, layer.kind, shape, f"{layer.weights_before:,} -> {layer.weights_after:,}",
                     _pct(layer.sparsity), "excluded" if layer.excluded else _pct(layer.removed_fraction)))
    rates = "".join(f", {pattern} {rate:g}" for pattern, rate in cfg.group_rates)
    out.table(f"{cfg.method} pruning, rate {cfg.rate:g}{rates}: {Path(r.input).name} -> {r.output}",
              ["layer", "type", "weight shape", "weights", "zeros", "removed"], rows,
              right=("weights", "zeros", "removed"),
              caption="zeros: share of the layer's stored weights that are 0; removed: gone or zeroed, of the original")
    b, a, ratio = r.before, r.after, r.ratios()
    macs_note = "" if structured or cfg.rate == 0 else " (dense kernels multiply the zeros too)"
    size_note = "" if structured or cfg.rate == 0 else " (zeros are stored: the dense file does not shrink)"
    out.table("totals", ["", "before", "after", "after / before"], [
        ("parameters", b.parameters, a.parameters, _x(ratio["parameters"])),
        ("non-zero parameters", b.nonzero_parameters, a.nonzero_parameters, _x(ratio["nonzero_parameters"])),
        (f"MACs at {r.size}px{macs_note}", _g(b.macs), _g(a.macs), _x(ratio["macs"])),
        (f"size on disk{size_note}", _bytes(b.size_bytes), _bytes(a.size_bytes), _x(ratio["size_bytes"])),
        ("size zipped", _bytes(b.zipped_bytes), _bytes(a.zipped_bytes), _x(ratio["zipped_bytes"])),
    ], right=("before", "after", "after / before"),
        caption="'before' is the input model saved in the same tbopt artifact format")
    q = r.quality
    quality = {
        "scored on": q["images"],
        "fidelity to the input model": _db(q.get("fidelity_psnr_db"), f"worst image {_db(q.get('worst_fidelity_db'))}"),
    }
    if q.get("target_psnr_before_db") is not None:
        change = q.get("target_psnr_change_db")
        quality["PSNR vs targets"] = (f"{_db(q['target_psnr_before_db'])} -> {_db(q['target_psnr_after_db'])} "
                                      f"({change:+.2f} dB; doing nothing scores {_db(q.get('do_nothing_psnr_db'))})")
    if "fidelity_pruned_only_db" in q:
        before_ft = f"fidelity {_db(q['fidelity_pruned_only_db'])}"
        if q.get("target_psnr_pruned_only_db") is not None:
            before_ft += f", PSNR vs targets {_db(q['target_psnr_pruned_only_db'])}"
        quality["before fine-tuning"] = before_ft
    ft = r.finetune
    if ft.get("steps"):
        quality["fine-tuning"] = (f"{ft['steps']} steps of {ft['batch_size']} on {ft['images']}, "
                                  f"{ft.get('loss', 'l1').upper()} {ft['first_loss']:.6f} -> {ft['last_loss']:.6f}")
    s = r.seconds
    order = ["images", "prune", "finetune", "evaluate", "write", "total"]
    quality["time"] = ", ".join(f"{k} {s[k]:.1f} s" for k in sorted(s, key=lambda k: (order + [k]).index(k)))
    out.fields("quality", quality)
    for note in r.notes:
        out.line(f"Note: {note}")


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


def _db(v: float | None, extra: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f} dB" + (f" ({extra})" if extra else "")
