"""What a Core ML file says about itself: its description (author, licence, version, what goes in and
comes out) and tbopt's own ``tbopt.*`` metadata (source, architecture, preprocessing, history, the
export's configuration), which ``tbopt info`` and the runners read back."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..core.artifact import ArchSpec, HistoryStep, Preprocessing
from .config import META_PREFIX, ExportConfig, ExportPlan


def compression_label(config: ExportConfig, sparse: bool) -> str:
    """How conv/linear weights are stored, in words (e.g. "4-bit palettized (k-means LUT per tensor), sparse")."""
    mode = config.weight_mode
    if mode == "int4":
        label = f"int4 per-block (linear, a scale per {config.int4_block_size} input channels)"
    elif config.palette_bits is not None:
        tables = f"per group of {config.palette_group_size} output channels" if config.grouped else "per tensor"
        scales = ", per-channel scales" if config.per_channel_scale else ""
        bits = (f"palettized, bits by layer within the {config.palette_bits}-bit size" if config.bits_by_layer
                else f"{config.palette_bits}-bit palettized")
        lut = "LUT chosen by GPTQ" if config.palette_method == "gptq" else "k-means LUT"
        label = f"{bits} ({lut} {tables}{scales})"
    else:
        label = {"fp16": "fp16", "fp32": "fp32", "int8": "int8 per-channel (linear)"}[mode]
    return label + (", sparse" if sparse else "")


def compute_label(config: ExportConfig) -> str:
    """The compute precision a file fixes, with a separator ("" for a NeuralNetwork, whose precision
    the device picks when it loads the model: fp32 on the CPU, fp16 on the GPU and Neural Engine)."""
    if config.format != "mlprogram":
        return ""
    if config.precision == "fp16" and config.io == "image":
        return "fp16 compute, image post-processing in fp32; "
    return f"{config.precision} compute, "


def file_preprocessing(config: ExportConfig, prep: Preprocessing, size: int) -> dict[str, Any]:
    """``tbopt.preprocessing`` of a file: what goes in and what the file (not the network) gives out.

    An image-I/O file outputs the made-up image ("output": "image", in 0..255) whatever its network
    returns; "network_output" keeps what the network inside returns. Earlier files said "residual"
    for image I/O: readers take an image output as the made-up image whatever the label says
    (``coreml.spec.CoreMLModelFile.preprocessing``).
    """
    d = {**prep.to_dict(), "size": size}
    if config.io == "image":
        d.update(output="image", network_output=prep.output)
    return d


def activations_label(config: ExportConfig) -> str:
    """How activations are stored: "float" or "int8 (quantize/dequantize pairs, calibrated)"."""
    return "int8 (quantize/dequantize pairs, calibrated)" if config.activations == "int8" else "float"


def describe(spec: Any, config: ExportConfig, plan: ExportPlan, size: int, prep: Preprocessing,
             history: list[HistoryStep], *, arch: ArchSpec | None = None, source_sha256: str | None = None,
             bits_by_layer: str | None = None) -> None:
    """Write the description and tbopt's metadata into ``spec`` (in place). ``bits_by_layer``: the
    palette bits of the conv/linear weights in graph order (``--bits-by-layer``), e.g. "[6,4,3]"."""
    is_tinybeauty = arch is not None and arch.name == "tinybeauty"
    if is_tinybeauty:
        net = "TinyBeauty facial makeup"
    else:
        net = f"{arch.target} image-to-image network" if arch is not None else "image-to-image network"
    md = spec.description.metadata
    md.author = config.author or ("TinyBeauty (ECCV 2024) architecture; Core ML export by tbopt"
                                  if is_tinybeauty else f"exported by tbopt {__version__}")
    md.license = config.license or "not specified by the checkpoint"
    md.versionString = config.model_version
    lo, hi = prep.value_range
    compute = compute_label(config)
    if config.io == "image":
        md.shortDescription = (f"{net}: a {size}x{size} RGB face crop in, the made-up face out "
                               f"({compute}{compression_label(config, plan.sparse)} weights"
                               f"{', int8 activations' if config.activations else ''}).")
        in_desc = f"RGB face crop, {size}x{size}; Core ML scales it so the network sees [{lo:g}, {hi:g}]"
        made_up = "clamp(r" if prep.output == "image" else "clamp(x + r"
        out_desc = (f"made-up face, {size}x{size} RGB, computed in the graph as "
                    f"({made_up}, {lo:g}, {hi:g}) - {lo:g}) * {255 / (hi - lo):g}")
    else:
        md.shortDescription = (f"{net}: a (1, 3, {size}, {size}) float array in [{lo:g}, {hi:g}] in, "
                               f"the {'image' if prep.output == 'image' else 'residual'} out "
                               f"({compute}{compression_label(config, plan.sparse)} weights"
                               f"{', int8 activations' if config.activations else ''}).")
        in_desc = f"float32 (1, 3, {size}, {size}), RGB scaled to [{lo:g}, {hi:g}]"
        out_desc = ("made-up image in the input's range" if prep.output == "image" else
                    f"residual r in ({lo:g}, {hi:g}); the made-up face is clamp(input + r, {lo:g}, {hi:g})")
    spec.description.input[0].shortDescription = in_desc
    spec.description.output[0].shortDescription = out_desc
    user = md.userDefined
    compact = dict(separators=(",", ":"), default=str)
    user[META_PREFIX + "version"] = __version__
    if source_sha256 is not None:
        user[META_PREFIX + "source_sha256"] = source_sha256
    if arch is not None:
        user[META_PREFIX + "architecture"] = arch.describe()
        user[META_PREFIX + "arch"] = json.dumps(arch.to_dict(), **compact)
    user[META_PREFIX + "preprocessing"] = json.dumps(file_preprocessing(config, prep, size), **compact)
    user[META_PREFIX + "history"] = json.dumps([h.to_dict() for h in history], **compact)
    user[META_PREFIX + "export"] = json.dumps(config.to_dict(), **compact)
    if bits_by_layer is not None:
        user[META_PREFIX + "bits_by_layer"] = bits_by_layer
