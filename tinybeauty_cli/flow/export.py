"""tbopt export as a command: open a float model, make the Core ML model (:mod:`..export.convert`),
write it atomically, check the written file (:mod:`..export.validate`) before it lands, and report
its sizes and graph.

The output's extension picks the format: ``.mlmodel`` (NeuralNetwork, iOS 13+) or ``.mlpackage``
(ML Program, iOS 15+). With ``io="image"`` the model takes an RGB image (Core ML scales it so the
network sees [-1, 1]) and returns the made-up RGB image, computed inside the graph; with
``io="tensor"`` a float multiarray goes in and the residual comes out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..core.artifact import HistoryStep
from ..core.checkpoint import LoadedModel, load_model
from ..core.counts import input_channels
from ..core.errors import InputError, UnsupportedError, UsageError
from ..core.files import atomic_output, check_output, size_on_disk, zipped_size
from ..core.images import uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.sanity import require_finite_on
from ..coreml.spec import graph_op_counts, load_spec, neural_network_weight_bytes, package_parts
from ..export.config import FORMAT_BY_SUFFIX, FORMAT_NAMES, ExportConfig, format_for_path
from ..export.convert import bits_for_export, export_module, plan_for
from ..export.metadata import compression_label
from ..export.mixed import bits_by_name
from ..export.palette_gptq import calibration_inputs, gptq_palettized
from ..export.palettes import palettes_fitted
from ..export.prepare import coreml_ready_module
from ..export.validate import check_images, validate_export
from .prune import unlabeled_images
from .quantize import calibration_images


@dataclass
class ExportResult:
    path: str
    format: str
    target: str
    precision: str
    weights: str  # how conv/linear weights are stored
    sparse: bool
    io: str
    size: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    size_bytes: int
    zipped_bytes: int
    graph_bytes: int  # graph description (model.mlmodel in a package; the non-weight part of a .mlmodel)
    weight_bytes: int
    ops: dict[str, int]  # op (ML Program) or layer (NeuralNetwork) types and counts
    casts: int
    parameters: int
    zero_fraction: float
    sparse_tensors: int  # weight tensors stored sparse
    validation: dict[str, Any]
    seconds: float
    notes: list[str]
    config: dict[str, Any]
    source: str
    source_sha256: str
    activations: dict[str, Any] | None = None  # int8 activations: calibration source, images, pairs
    command: str = ""  # the tbopt export command that writes this file again
    palette_fit: dict[str, Any] | None = None  # what --fit-palettes did (PaletteFit.to_dict)
    bits_by_layer: dict[str, Any] | None = None  # --bits-by-layer: each layer's bits (BitAllocation.to_dict)
    palette_gptq: dict[str, Any] | None = None  # --palette-method gptq: what it did (GptqReport.to_dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _refuse_torchscript(loaded: LoadedModel) -> None:
    if loaded.kind != "torchscript":
        return
    if loaded.metadata.get("quantized"):
        raise UnsupportedError(
            f"{loaded.path} is an int8 TorchScript model (from tbopt quantize); its PyTorch int8 weights "
            f"cannot be carried into Core ML",
            hint="export the float checkpoint it was made from with --weights int8 "
                 "(int8 per-channel weights in the Core ML file)")
    raise UnsupportedError(f"{loaded.path} is a TorchScript archive; tbopt exports float checkpoints and "
                           f"tbopt artifacts", hint="export the float checkpoint it was made from")


def file_sizes(path: Path, fmt: str) -> dict[str, int]:
    """Bytes on disk and zipped, and how they split into graph description and weights."""
    total = size_on_disk(path)
    if fmt == "mlprogram":
        graph, weights = package_parts(path)
        graph_bytes = graph.stat().st_size
        weight_bytes = weights.stat().st_size if weights is not None else 0
    else:
        weight_bytes = neural_network_weight_bytes(load_spec(path))
        graph_bytes = total - weight_bytes
    return {"size_bytes": total, "zipped_bytes": zipped_size(path), "graph_bytes": graph_bytes,
            "weight_bytes": weight_bytes}


def export_loaded(loaded: LoadedModel, output: Path | str, config: ExportConfig, *, force: bool = False,
                  progress: Progress | None = None, fits: dict[tuple, Any] | None = None) -> ExportResult:
    """Export an opened float model to ``output`` (written atomically, validated before it lands).

    ``loaded`` may be built in memory: its path is only a label and its ``sha256`` is taken as given.
    ``fits``: a dict the caller keeps across exports; a palette fit of the same model (``sha256``),
    bits and fit settings is then done once and reused (``tbopt optimize`` writes one fit for
    several targets).
    """
    started = time.perf_counter()
    progress = progress or SilentProgress()
    output = Path(output)
    if format_for_path(output) != config.format:
        raise UsageError(f"{output.name} is a {FORMAT_NAMES[format_for_path(output)]} file but the configuration "
                         f"asks for {FORMAT_NAMES[config.format]}")
    _refuse_torchscript(loaded)
    check_output(output, force, inputs=(loaded.path,))
    artifact = loaded.artifact
    assert artifact is not None and loaded.module is not None
    model = loaded.module.eval()
    plan = plan_for(model, config)  # a target too low is refused before any work
    command = config.command_line(loaded.path, output)
    history = list(artifact.history)
    size = config.size or artifact.preprocessing.size
    # the float model on the images the written file will be checked on, before any work
    check_x, check_names = check_images(size, artifact.preprocessing)
    require_finite_on(loaded.path, model, torch.from_numpy(check_x), check_names)
    calibration, calib_source = None, None
    if config.activations or config.bits_by_layer or config.palette_method == "gptq":
        calib_set, _skipped = calibration_images(Path(config.calib) if config.calib else None, config.calib_count,
                                                 size, progress)
        calibration, calib_source = calib_set.inputs, calib_set.source
        require_finite_on(loaded.path, model, torch.from_numpy(uint8_to_model(calibration,
                                                                              artifact.preprocessing.value_range)),
                          calib_set.image_labels())
    allocation = None
    if config.bits_by_layer:  # chosen on the float model, before any fitting: the fit keeps each layer's bits
        ready = coreml_ready_module(model, size, config.format, input_channels(model))
        allocation = bits_for_export(ready, config, plan, calibration, artifact.preprocessing, progress)
    bits = None
    if config.palette_bits is not None:
        bits = config.palette_bits if allocation is None else bits_by_name(
            model, allocation, torch.zeros(1, input_channels(model), size, size))
    palette_gptq = None
    original = model
    if config.palette_method == "gptq":  # the fit, if any, then trains these tables' values
        images = calibration_inputs(calibration, artifact.preprocessing.value_range)
        model, report = gptq_palettized(model, bits, images,
                                        group_size=config.palette_group_size if config.grouped else None,
                                        seed=config.seed, progress=progress)
        palette_gptq = {"calibration": calib_source, **report.to_dict()}
        # the export step after it records the configuration: this one only what GPTQ did (each byte counts
        # against the size the tables were chosen for)
        history.append(HistoryStep.now("gptq-palettes", command, None, report.to_dict()))
        plan = plan_for(model, config)  # zeros may have moved to other entries
    palette_fit = None
    if config.fit_palettes:
        key = (loaded.sha256, json.dumps(bits if isinstance(bits, int) else sorted(bits.items())), size,
               config.fit_palettes, config.fit_data, config.seed, config.fit_images, config.fit_batch_size,
               config.fit_lr, config.palette_method, config.calib, config.calib_count)
        if fits is not None and key in fits:
            model, fit = fits[key]
        else:
            model, fit = _fit_palettes(model, config, bits, size, progress, teacher=original, label=loaded.path)
            if fits is not None:
                fits[key] = (model, fit)
        palette_fit = fit.to_dict()
        history.append(HistoryStep.now("fit-palettes", command, config.to_dict(), palette_fit))
        plan = plan_for(model, config)  # trained palette values: a cluster of zeros may be zero no more

    with progress.task(f"exporting {output.name}", total=4) as advance:
        exported = export_module(model, config, preprocessing=artifact.preprocessing, history=history,
                                 arch=artifact.arch, source_sha256=loaded.sha256, plan=plan, advance=advance,
                                 calibration=calibration, command=command, allocation=allocation)
        with atomic_output(output, force=force, directory=config.format == "mlprogram") as tmp:
            exported.save(tmp)
            validation, inputs, outputs = validate_export(tmp, exported, model,
                                                          labels=(str(loaded.path), f"the exported {output.name}"))
            sizes = file_sizes(tmp, config.format)
            ops = graph_op_counts(load_spec(tmp))
        advance(1)
    params = sum(p.numel() for p in model.parameters())
    notes = list(plan.notes)
    if allocation is not None and allocation.predicted_error > allocation.uniform_error:
        notes.append(f"bits by layer: no choice within the budget (its record in the file included) beats "
                     f"{allocation.uniform_bits} bits everywhere on the calibration images; the closest is kept")
    return ExportResult(
        path=str(output), format=config.format, target=plan.target, precision=config.precision,
        weights=compression_label(config, plan.sparse), sparse=plan.sparse, io=config.io, size=exported.size,
        inputs=inputs, outputs=outputs, **sizes, ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        casts=ops.get("cast", 0), parameters=params, zero_fraction=round(plan.zero_fraction, 4),
        sparse_tensors=ops.get("constexpr_sparse_to_dense", 0), validation=validation,
        seconds=round(time.perf_counter() - started, 2), notes=notes, config=config.to_dict(),
        source=str(loaded.path), source_sha256=loaded.sha256, command=command, palette_fit=palette_fit,
        palette_gptq=palette_gptq,
        bits_by_layer=None if exported.bits_by_layer is None else {
            "calibration": calib_source, **exported.bits_by_layer.to_dict()},
        activations=None if exported.activations is None else {
            "dtype": config.activations, "calibration": calib_source, **exported.activations.to_dict()})


def _fit_palettes(model: nn.Module, config: ExportConfig, bits: int | dict[str, int], size: int,
                  progress: Progress, teacher: nn.Module, label: object) -> tuple[nn.Module, Any]:
    """``model`` fitted onto its palettes of ``bits`` (one size, or by layer name) on the fit images
    (:func:`..export.palettes.palettes_fitted`), distilled from ``teacher`` (the float model, ``label``)."""
    images = unlabeled_images(Path(config.fit_data) if config.fit_data else None, size, config.fit_images)
    pool = torch.from_numpy(uint8_to_model(images.inputs))
    require_finite_on(label, teacher, pool, images.image_labels())  # a NaN target would train NaN weights
    return palettes_fitted(model, bits, pool, steps=config.fit_palettes, seed=config.seed,
                           lr=config.fit_lr, batch_size=config.fit_batch_size, progress=progress, teacher=teacher)


def export_file(path: Path | str, output: Path | str, config: ExportConfig, *, force: bool = False,
                progress: Progress | None = None, arch: str | None = None,
                arch_kwargs: str | Mapping[str, Any] | None = None, trust_pickle: bool = False) -> ExportResult:
    """Open a model file and export it (see :func:`export_loaded`); checks the output path first."""
    output, path = Path(output), Path(path)
    format_for_path(output)
    if path.suffix.lower() in FORMAT_BY_SUFFIX:
        raise InputError(f"{path} is already a Core ML model; tbopt export converts float PyTorch models",
                         hint="give the checkpoint or tbopt artifact it was exported from")
    check_output(output, force, inputs=(path,))
    loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    return export_loaded(loaded, output, config, force=force, progress=progress)
