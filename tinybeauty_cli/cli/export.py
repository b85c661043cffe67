"""tbopt export: write a Core ML model (.mlmodel or .mlpackage) for iOS."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..export.config import DEFAULT_CALIB_COUNT, DEFAULT_WEIGHTS, ExportConfig
from . import _imports, _output
from ._errors import handle_errors
from ._options import ArchKwargsOpt, ArchOpt, ForceOpt, JsonOpt, QuietOpt, TrustPickleOpt, model_options

if TYPE_CHECKING:
    from ..flow.export import ExportResult

PANEL = "Core ML"

SourceArg = Annotated[
    Optional[Path],
    typer.Argument(help="Float model to export: a checkpoint (.pt) or a tbopt artifact (e.g. from tbopt prune). "
                        "Default: the bundled demo checkpoint.", show_default=False),
]


class WeightsChoice(str, Enum):
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"
    pal8 = "pal8"
    pal6 = "pal6"
    pal4 = "pal4"
    pal3 = "pal3"
    pal2 = "pal2"


class GranularityChoice(str, Enum):
    per_tensor = "per-tensor"
    per_grouped_channel = "per-grouped-channel"


class BitsByLayerChoice(str, Enum):
    auto = "auto"


class PaletteMethodChoice(str, Enum):
    kmeans = "kmeans"
    gptq = "gptq"


class ActivationsChoice(str, Enum):
    int8 = "int8"


class SparseChoice(str, Enum):
    auto = "auto"
    off = "off"


class TargetChoice(str, Enum):
    iOS13 = "iOS13"
    iOS14 = "iOS14"
    iOS15 = "iOS15"
    iOS16 = "iOS16"
    iOS17 = "iOS17"
    iOS18 = "iOS18"


class IOChoice(str, Enum):
    image = "image"
    tensor = "tensor"


@handle_errors
def export(
    artifact: SourceArg = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="FILE", help="Core ML file to write; the extension picks the format: .mlmodel (NeuralNetwork, "
                               "iOS 13+) or .mlpackage (ML Program, iOS 15+).")] = Path("TinyBeauty.mlmodel"),
    fp16: Annotated[Optional[bool], typer.Option(
        "--fp16/--fp32", help="fp16 weights (about twice the bytes of the default int8), or fp32 weights and "
                              "compute. With --weights: the compute precision of an ML Program (fp16 unless "
                              "--fp32). Default: int8 weights, fp16 compute.",
        rich_help_panel=PANEL, show_default=False)] = None,
    weights: Annotated[Optional[WeightsChoice], typer.Option(
        "--weights", case_sensitive=False, help="Store conv weights as fp16, int8 (linear, per output channel), int4 (linear, per block "
                          "of input channels, iOS18) or palettized to N bits (palN: k-means look-up table per "
                          "tensor, or per group with --granularity). Default: int8, as tbopt run stores; with "
                          "--fp16 or --fp32 and no --weights, that precision.",
        rich_help_panel=PANEL, show_default=False)] = None,
    block_size: Annotated[Optional[int], typer.Option(
        "--block-size", min=1, help="--weights int4: input channels that share a scale (default 8; a layer they do "
                                    "not divide gets the largest common divisor).",
        rich_help_panel=PANEL, show_default=False)] = None,
    granularity: Annotated[GranularityChoice, typer.Option(
        "--granularity", case_sensitive=False, help="Palettes: one look-up table per tensor, or per group of output channels (iOS18).",
        rich_help_panel=PANEL)] = GranularityChoice.per_tensor,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", min=1, help="--granularity per-grouped-channel: output channels per table (default 1; a "
                                    "layer it does not divide gets the largest common divisor).",
        rich_help_panel=PANEL, show_default=False)] = None,
    per_channel_scale: Annotated[bool, typer.Option(
        "--per-channel-scale", help="Palettes: scale the weights to [-1, 1] along the output channels before "
                                    "clustering, the scales stored beside the tables (iOS18).",
        rich_help_panel=PANEL)] = False,
    bits_by_layer: Annotated[Optional[BitsByLayerChoice], typer.Option(
        "--bits-by-layer", case_sensitive=False, help="With --weights palN: auto chooses each layer's palette size (N-2 to 8 bits) "
                                "from its measured sensitivity on the calibration images (--calib), the weights no "
                                "larger than N bits everywhere; the choice is recorded in the file (ML Program: "
                                "iOS18, with a lower --target 3 bits are left out; .mlmodel: iOS13).",
        rich_help_panel=PANEL,
        show_default=False)] = None,
    palette_method: Annotated[PaletteMethodChoice, typer.Option(
        "--palette-method", case_sensitive=False, help="Palettes: kmeans rounds each weight to its nearest k-means table entry; gptq "
                                 "chooses the entries (GPTQ) and refits the table values for each layer's output "
                                 "on the calibration images (--calib, --calib-count). Same tables, same bytes.",
        rich_help_panel=PANEL)] = PaletteMethodChoice.kmeans,
    activations: Annotated[Optional[ActivationsChoice], typer.Option(
        "--activations", case_sensitive=False, help="int8: quantize/dequantize pairs around convolutions and additions (W8A8 with "
                              "--weights int8; ML Program, iOS17+), ranges calibrated with tbopt's reference "
                              "executor. Default: float activations.", rich_help_panel=PANEL,
        show_default=False)] = None,
    calib: Annotated[Optional[Path], typer.Option(
        "--calib", help="--activations int8, --bits-by-layer, --palette-method gptq and --fit-palettes: folder "
                        "of unlabeled photos, never the test set "
                        "(of pairs, only the inputs). Default: synthetic portraits.", rich_help_panel=PANEL,
        show_default=False)] = None,
    calib_count: Annotated[int, typer.Option(
        "--calib-count", min=1, help="--activations int8, --bits-by-layer and --palette-method gptq: calibration "
                                     "images to use (16, the count the measured figures used; tbopt quantize "
                                     "calibrates int8 on 32).",
        rich_help_panel=PANEL)] = DEFAULT_CALIB_COUNT,
    sparse: Annotated[SparseChoice, typer.Option(
        "--sparse", case_sensitive=False, help="auto: a pruned checkpoint (>= 10% zero weights) is stored sparse in an ML Program "
                         "(iOS16+; with int8 or palettes iOS18+). off: always dense.",
        rich_help_panel=PANEL)] = SparseChoice.auto,
    target: Annotated[Optional[TargetChoice], typer.Option(
        "--target", case_sensitive=False, help="Minimum iOS version. Default: the lowest the format and the "
                                               "compression allow.", rich_help_panel=PANEL, show_default=False)] = None,
    io: Annotated[IOChoice, typer.Option(
        "--io", case_sensitive=False, help="image: RGB image in, made-up RGB image out. tensor: float array in [-1, 1] in, residual out.",
        rich_help_panel=PANEL)] = IOChoice.image,
    size: Annotated[Optional[int], typer.Option(
        "--size", min=8, help="Input size N (N x N). Default: the model's own (256).", rich_help_panel=PANEL,
        show_default=False)] = None,
    fit_palettes: Annotated[int, typer.Option(
        "--fit-palettes", min=0, metavar="N", help="With --weights palN: first fine-tune the model onto its palettes "
        "for N steps (every weight keeps its k-means cluster, the palette values are trained to reproduce the "
        "model's own made-up images).", rich_help_panel="Palette fitting")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --fit-palettes (same seed, same threads: same "
                                                     "weights).", rich_help_panel="Palette fitting")] = 0,
    author: Annotated[Optional[str], typer.Option("--author", help="Author in the model's metadata.",
                                                  rich_help_panel="Metadata", show_default=False)] = None,
    license_: Annotated[Optional[str], typer.Option("--license", help="Licence in the model's metadata.",
                                                    rich_help_panel="Metadata", show_default=False)] = None,
    model_version: Annotated[str, typer.Option("--model-version", help="Version string in the model's metadata.",
                                               rich_help_panel="Metadata")] = "1.0",
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="CPU threads for what export computes (--palette-method gptq, --fit-palettes, "
                                 "--bits-by-layer, --activations, validation); the same seed and threads give the "
                                 "same weights. Default: all cores.", rich_help_panel="Timing",
        show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
) -> None:
    """Export to Core ML for iOS (.mlmodel for iOS 13+, .mlpackage for iOS 15+), compressed, validated."""
    _imports.coreml()
    _imports.quantization()  # coremltools.optimize imports torch.ao.quantization
    from ..core.contexts import torch_threads  # noqa: PLC0415 - torch
    from ..flow.export import export_file  # noqa: PLC0415 - torch and coremltools

    out = _output.Output(json_mode=json_out, quiet=quiet)
    path = out.model_or_demo(artifact)
    config = ExportConfig.for_output(
        output, precision="fp32" if fp16 is False else "fp16", weights=_weights(fp16, weights),
        sparse=sparse.value, target=target.value if target else None, io=io.value, size=size,
        author=author, license=license_, model_version=model_version,
        activations=activations.value if activations else None,
        calib=str(calib) if calib and (activations or bits_by_layer or palette_method.value == "gptq") else None,
        calib_count=calib_count, palette_method=palette_method.value,
        block_size=block_size, bits_by_layer=bits_by_layer.value if bits_by_layer else None,
        granularity=granularity.value, group_size=group_size, per_channel_scale=per_channel_scale,
        fit_palettes=fit_palettes, fit_data=str(calib) if calib and fit_palettes else None, seed=seed,
        threads=threads)
    with torch_threads(threads):
        result = export_file(path, output, config, force=force, progress=out,
                             **model_options(arch, arch_kwargs, trust_pickle))
    out.emit(result, render_export)


def _weights(fp16: bool | None, weights: WeightsChoice | None) -> str | None:
    """The weight storage: --weights if given; else --fp16/--fp32's precision (None), else int8 --
    the storage tbopt run's .mlmodel has, under 100 KB where fp16 is about twice that."""
    if weights is not None:
        return weights.value
    return None if fp16 is not None else DEFAULT_WEIGHTS


def _feature(f: dict) -> str:
    if f["type"] == "image":
        return f"{f['name']}: {f['color']} image {f['shape'][1]}x{f['shape'][0]}"
    return f"{f['name']}: {f.get('dtype', '')} array {tuple(f.get('shape', ()))}"


def render_export(out: _output.Output, r: ExportResult) -> None:
    v = r.validation
    kb = _output.kb
    for note in r.notes:
        out.note(f"Note: {note}")
    compute_ops = {k: n for k, n in r.ops.items() if not k.startswith("constexpr_")}
    weight_ops = sum(n for k, n in r.ops.items() if k.startswith("constexpr_"))
    out.fields(f"exported {r.path}", {
        "format": {"neuralnetwork": "NeuralNetwork (.mlmodel)", "mlprogram": "ML Program (.mlpackage)"}[r.format],
        "target": f"{r.target} or later",
        "precision": r.precision,
        "weights": r.weights + (f" ({r.zero_fraction:.0%} zeros in the checkpoint)" if r.zero_fraction else ""),
        **({"activations": f"int8: {a['quantize_dequantize_pairs']} quantize/dequantize pairs, ranges from "
                           f"{a['calibration']}"} if (a := r.activations) else {}),
        "input": _feature(r.inputs[0]),
        "output": _feature(r.outputs[0]),
        "size on disk": f"{kb(r.size_bytes)} KB ({r.size_bytes:,} B)",
        "size zipped": f"{kb(r.zipped_bytes)} KB ({r.zipped_bytes:,} B)",
        "graph description": f"{kb(r.graph_bytes)} KB ({r.graph_bytes:,} B)",
        "weights stored": f"{kb(r.weight_bytes)} KB ({r.weight_bytes:,} B)",
        "graph": f"{sum(compute_ops.values())} {'layers' if r.format == 'neuralnetwork' else 'ops'}"
                 + (f" + {weight_ops} weight decompressions" if weight_ops else "") + f", {r.casts} casts",
        "validation": (f"passed: spec loads, interface {v['interface']}, {v['weights_decompressed']} weight tensors "
                       f"read back (largest error {v['max_weight_error']:.2%} in {v['max_weight_error_tensor']})"
                       + (f"; {', '.join(v['rewritten_by_converter'])} rewritten by the converter (ops folded "
                          "into them), checked by running the file" if v.get("rewritten_by_converter") else "")),
        ("fidelity" if r.activations or v.get("rewritten_by_converter") else "weights fidelity"): (
            f"{v['fidelity_psnr_db']:.1f} dB (worst {v['worst_fidelity_db']:.1f} dB) on {v['images']} images: "
            f"{v['numerical_check'].split(' (')[0]}"),
        **({"bits by layer": _bits_by_layer(r.bits_by_layer)} if r.bits_by_layer else {}),
        **({"GPTQ palettes": _palette_gptq(r.palette_gptq)} if r.palette_gptq else {}),
        **({"palettes fitted": _palette_fit(r.palette_fit)} if r.palette_fit else {}),
        "time": f"{r.seconds:.1f} s",
        "rebuild": r.command,
    })


def _bits_by_layer(b: dict) -> str:
    groups: dict[int, list[str]] = {}
    for layer in b["layers"]:
        groups.setdefault(layer["bits"], []).append(".".join(layer["layer"].split(".")[-2:]))
    parts = [f"{bits}-bit: " + (", ".join(names) if bits != b["uniform_bits"] else f"{len(names)} layers")
             for bits, names in sorted(groups.items(), reverse=True)]
    gain = b["predicted_gain_db"]
    return (f"{'; '.join(parts)} ({b['weight_bytes']:,} B of weights, {b['uniform_bytes']:,} B at "
            f"{b['uniform_bits']} bits everywhere; sensitivities on {b['calibration_images']} images, predicted "
            f"{'+' if gain is not None and gain >= 0 else ''}{gain} dB)")


def _palette_fit(f: dict) -> str:
    return (f"{f['steps']} steps on {f['images']} images in {f['seconds']:.1f} s; palette error (mean |difference| "
            f"of made-up images vs the model before) {f['palette_error_before']:.5f} snapped -> "
            f"{f['palette_error_after']:.5f} fitted")


def _palette_gptq(g: dict) -> str:
    kmeans = "" if g["kmeans_layers"] == 0 else f" (+{g['kmeans_layers']} by k-means)"
    return (f"{g['layers']} layers{kmeans} on {g['calibration']} in {g['seconds']:.1f} s; layer output error "
            f"(mean over layers) {g['output_error_kmeans_db']} dB with k-means tables -> "
            f"{g['output_error_gptq_db']} dB")
