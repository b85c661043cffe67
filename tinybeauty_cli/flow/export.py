"""tbopt export as a command: open a float model, make the Core ML model (:mod:`..export.convert`),
write it atomically, check the written file (:mod:`..export.validate`) before it lands, and report
its sizes and graph.

The output's extension picks the format: ``.mlmodel`` (NeuralNetwork, iOS 13+) or ``.mlpackage``
(ML Program, iOS 15+). With ``io="image"`` the model takes an RGB image (Core ML scales it so the
network sees [-1, 1]) and returns the made-up RGB image, computed inside the graph; with
``io="tensor"`` a float multiarray goes in and the residual comes out.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import numpy as np
from torch import nn

from ..core.artifact import HistoryStep, Preprocessing
from ..core.checkpoint import LoadedModel, load_model
from ..core.counts import input_channels
from ..core.errors import InputError, UnsupportedError, UsageError
from ..core.files import atomic_output, check_output
from ..core.fingerprint import weights_fingerprint
from ..core.images import uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.sanity import require_finite_on, require_finite_output
from ..core.written import WrittenFile
from ..coreml.spec import (coremltools, graph_op_counts, held, load_spec, neural_network_weight_bytes, package_parts,
                           quiet, read_coreml, spec_of_bytes)
from ..coreml.weights import carry_file_weights, stored_weights
from ..export.config import FORMAT_BY_SUFFIX, FORMAT_NAMES, ExportConfig, ExportError, format_for_path
from ..export.convert import ExportedModel, bits_for_export, export_module, plan_for
from ..export.metadata import compression_label
from ..export.mixed import bits_by_name
from ..export.palette_gptq import calibration_inputs, gptq_palettized
from ..export.palettes import palettes_fitted
from ..export.prepare import coreml_ready_module
from ..export.validate import LABELS, check_images, made_up_fidelity, validate_export
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
    #: The file as written (hash, sizes, spec); not part of ``to_dict``.
    file: WrittenFile | None = field(default=None, repr=False, compare=False)
    #: Its stored weights, decompressed, as read with it (``coreml.weights.stored_weights``); not part of ``to_dict``.
    stored_weights: list | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("file", "stored_weights")}


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


def export_loaded(loaded: LoadedModel, output: Path | str, config: ExportConfig, *, force: bool = False,
                  progress: Progress | None = None, fits: dict[tuple, Any] | None = None) -> ExportResult:
    """Export an opened float model to ``output`` (written atomically, validated before it lands).

    ``loaded`` may be built in memory: its path is only a label and its ``sha256`` is taken as given.
    ``fits``: a dict the caller keeps across exports; a palette fit of the same weights (their
    fingerprint), bits and fit settings is then done once and reused (``tbopt optimize`` writes one fit
    for several targets). The result's ``file`` is the file as written (read once, in its temporary place).
    """
    started = time.perf_counter()
    progress = progress or SilentProgress()
    output = Path(output)
    if format_for_path(output) != config.format:
        raise UsageError(f"{output.name} is a {FORMAT_NAMES[format_for_path(output)]} file but the configuration "
                         f"asks for {FORMAT_NAMES[config.format]}")
    _refuse_torchscript(loaded)
    output = check_output(output, force, inputs=(loaded.path,))
    assert loaded.artifact is not None and loaded.module is not None
    prepared = _prepare(loaded, config, config.command_line(loaded.path, output), fits, progress)
    artifact, model, plan = loaded.artifact, prepared.model, prepared.plan
    with progress.task(f"exporting {output.name}", total=4) as advance:
        exported = export_module(model, config, preprocessing=artifact.preprocessing, history=prepared.history,
                                 arch=artifact.arch, source_sha256=loaded.sha256, plan=plan, advance=advance,
                                 calibration=prepared.calibration, command=prepared.command,
                                 allocation=prepared.allocation)
        with atomic_output(output, force=force, directory=config.format == "mlprogram") as tmp:
            save_coreml(exported, tmp)
            file, weights = read_written(tmp)
            labels = (str(loaded.path), f"the exported {output.name}")
            validation, inputs, outputs = validate_export(
                file.spec, weights, exported, model,
                run_file=lambda: executor_fidelity(tmp, model, exported.size, exported.preprocessing, labels),
                labels=labels)
            sizes = file_sizes(file, config.format)
        advance(1)
    ops = graph_op_counts(file.spec)
    notes = list(plan.notes)
    allocation = prepared.allocation
    if allocation is not None and allocation.predicted_error > allocation.uniform_error:
        notes.append(f"bits by layer: no choice within the budget (its record in the file included) beats "
                     f"{allocation.uniform_bits} bits everywhere on the calibration images; the closest is kept")
    return ExportResult(
        path=str(output), format=config.format, target=plan.target, precision=config.precision,
        weights=compression_label(config, plan.sparse), sparse=plan.sparse, io=config.io, size=exported.size,
        inputs=inputs, outputs=outputs, **sizes, ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        casts=ops.get("cast", 0), parameters=sum(p.numel() for p in model.parameters()),
        zero_fraction=round(plan.zero_fraction, 4), sparse_tensors=ops.get("constexpr_sparse_to_dense", 0),
        validation=validation, seconds=round(time.perf_counter() - started, 2), notes=notes, config=config.to_dict(),
        source=str(loaded.path), source_sha256=loaded.sha256, command=prepared.command,
        palette_fit=prepared.palette_fit, palette_gptq=prepared.palette_gptq,
        bits_by_layer=None if exported.bits_by_layer is None else {
            "calibration": prepared.calib_source, **exported.bits_by_layer.to_dict()},
        activations=None if exported.activations is None else {
            "dtype": config.activations, "calibration": prepared.calib_source, **exported.activations.to_dict()},
        file=file.moved_to(output), stored_weights=weights)


@dataclass
class _Prepared:
    """The model to convert and what its export records: calibration images, each layer's bits,
    GPTQ palettes and a palette fit where the configuration asks for them."""

    model: nn.Module
    plan: Any
    history: list[HistoryStep]
    command: str
    calibration: Any = None
    calib_source: str | None = None
    allocation: Any = None
    palette_gptq: dict[str, Any] | None = None
    palette_fit: dict[str, Any] | None = None


def _prepare(loaded: LoadedModel, config: ExportConfig, command: str, fits: dict[tuple, Any] | None,
             progress: Progress) -> _Prepared:
    artifact, model = loaded.artifact, loaded.module.eval()
    size = config.size or artifact.preprocessing.size
    p = _Prepared(model, plan_for(model, config), list(artifact.history), command)  # a target too low: refused now
    # the float model on the images the written file will be checked on, before any work
    check_x, check_names = check_images(size, artifact.preprocessing)
    require_finite_on(loaded.path, model, torch.from_numpy(check_x), check_names)
    if config.activations or config.bits_by_layer or config.palette_method == "gptq":
        calib_set, _skipped = calibration_images(Path(config.calib) if config.calib else None, config.calib_count,
                                                 size, progress)
        p.calibration, p.calib_source = calib_set.inputs, calib_set.source
        require_finite_on(loaded.path, model,
                          torch.from_numpy(uint8_to_model(calib_set.inputs, artifact.preprocessing.value_range)),
                          calib_set.image_labels())
    if config.bits_by_layer:  # chosen on the float model, before any fitting: the fit keeps each layer's bits
        ready = coreml_ready_module(model, size, config.format, input_channels(model))
        p.allocation = bits_for_export(ready, config, p.plan, p.calibration, artifact.preprocessing, progress)
    bits = None
    if config.palette_bits is not None:
        bits = config.palette_bits if p.allocation is None else bits_by_name(
            model, p.allocation, torch.zeros(1, input_channels(model), size, size))
    if config.palette_method == "gptq":  # the fit, if any, then trains these tables' values
        group_size = config.palette_group_size if config.grouped else None
        # the same weights, tables and calibration images give the same palettes whatever the target
        # (the search exports one model for several): keyed by the weights and the images themselves
        key = ("gptq", weights_fingerprint(model), json.dumps(bits if isinstance(bits, int) else sorted(bits.items())),
               group_size, config.seed, hashlib.sha256(np.ascontiguousarray(p.calibration).tobytes()).hexdigest())
        reused = fits is not None and key in fits
        if reused:
            gptq_model, report = fits[key]
            p.model = copy.deepcopy(gptq_model)  # the kept one is never handed out, so never edited
        else:
            images = calibration_inputs(p.calibration, artifact.preprocessing.value_range)
            p.model, report = gptq_palettized(model, bits, images, group_size=group_size, seed=config.seed,
                                              progress=progress)
            if fits is not None:
                fits[key] = (copy.deepcopy(p.model), report)
        p.palette_gptq = {"calibration": p.calib_source, **report.to_dict(), "reused": reused}
        # the export step after it records the configuration: this one only what GPTQ did (each byte counts
        # against the size the tables were chosen for)
        p.history.append(HistoryStep.now("gptq-palettes", command, None, report.to_dict()))
        p.plan = plan_for(p.model, config)  # zeros may have moved to other entries
    if config.fit_palettes:
        # keyed by the weights themselves (the model about to be fitted and its teacher), not by a name
        # or a hash taken as given; each export gets its own copy of the fitted model
        key = (weights_fingerprint(p.model), weights_fingerprint(model),
               json.dumps(bits if isinstance(bits, int) else sorted(bits.items())), size,
               config.fit_palettes, config.fit_data, config.seed, config.fit_images, config.fit_batch_size,
               config.fit_lr, config.palette_method, config.calib, config.calib_count)
        if fits is not None and key in fits:
            fitted, fit = fits[key]
            p.model = copy.deepcopy(fitted)  # the kept one is never handed out, so never edited
        else:
            p.model, fit = _fit_palettes(p.model, config, bits, size, progress, teacher=model, label=loaded.path)
            if fits is not None:
                fits[key] = (copy.deepcopy(p.model), fit)
        p.palette_fit = fit.to_dict()
        p.history.append(HistoryStep.now("fit-palettes", command, config.to_dict(), p.palette_fit))
        p.plan = plan_for(p.model, config)  # trained palette values: a cluster of zeros may be zero no more
    return p


# ---------------------------------------------------------------- the written file

def save_coreml(exported: ExportedModel, path: Path) -> None:
    """Write the ``.mlmodel`` / ``.mlpackage`` of ``exported`` to ``path`` (the caller makes it atomic)."""
    ct = coremltools()
    with quiet():
        weights_dir = exported.mlmodel.weights_dir if exported.config.format == "mlprogram" else None
        ct.models.MLModel(exported.spec, weights_dir=weights_dir, skip_model_load=True).save(str(path))


def read_written(path: Path) -> tuple[WrittenFile, list]:
    """The Core ML file just written at ``path``, read once: its bytes' hash and sizes, its spec and its
    stored weights, decompressed, all from those bytes. Raises :class:`ExportError` if it does not read back."""
    file = WrittenFile.of_file(path)
    with held(file) if file.is_folder else contextlib.nullcontext(path) as readable:
        try:
            spec = load_spec(readable) if file.is_folder else spec_of_bytes(file.content)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the written file does not load as a Core ML model: {exc}") from exc
        try:
            weights = stored_weights(readable, spec)
        except InputError as exc:
            raise ExportError(f"the written ML Program does not read back: {exc}") from exc
    return dataclasses.replace(file, spec=spec), weights


def executor_fidelity(path: Path, reference: nn.Module, size: int, prep: Preprocessing,
                      labels: tuple[str, str] = LABELS) -> dict:
    """Made-up images of the float model vs the file itself, run by tbopt's reference executor
    (what a file with int8 activations computes, which no PyTorch twin with its weights shows);
    image outputs compared before Core ML's 8-bit rounding. NaN or Inf in either is refused, naming
    it (``labels``: the float model, the file) and the image."""
    from ..coreml.runner import open_coreml_runner  # noqa: PLC0415

    x, names = check_images(size, prep)
    runner = open_coreml_runner(path, use_device=False, round_image_output=False)
    with torch.no_grad():
        out = reference(torch.from_numpy(x)).numpy()
    require_finite_output(labels[0], out, names)
    residual = runner.residual(x)
    require_finite_output(labels[1], residual, names)
    return made_up_fidelity(out if prep.output == "image" else x + out, x + residual, prep)


def file_sizes(file: WrittenFile, fmt: str) -> dict[str, int]:
    """Bytes on disk and zipped, and how they split into graph description and weights."""
    if fmt == "mlprogram":
        graph, weights = package_parts(file.path)
        graph_bytes = graph.stat().st_size
        weight_bytes = weights.stat().st_size if weights is not None else 0
    else:
        weight_bytes = neural_network_weight_bytes(file.spec)
        graph_bytes = file.size_bytes - weight_bytes
    return {"size_bytes": file.size_bytes, "zipped_bytes": file.zipped_bytes, "graph_bytes": graph_bytes,
            "weight_bytes": weight_bytes}


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
    output = check_output(output, force, inputs=(path,))
    loaded = load_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    return export_loaded(loaded, output, config, force=force, progress=progress)


def decompressed_twin(coreml_path: Path | str, source: LoadedModel) -> nn.Module:
    """A PyTorch model carrying exactly the weights a file written by ``tbopt export`` holds.

    Palettes are looked up, int8 weights scaled, sparse tensors expanded and fp16 values kept as
    rounded. The model maps a float (N, C, S, S) batch in the input range to what the file's graph
    returns (the same function apart from the compute precision: it runs in fp32). ``source`` is
    the float model the file was exported from; it gives the structure, the file's metadata the
    export options.
    """
    if source.artifact is None:
        raise UnsupportedError("the PyTorch twin of a Core ML file needs the float model it was exported from")
    meta = read_coreml(coreml_path).tbopt_metadata
    config = ExportConfig.from_dict(meta["export"])
    size = int(meta["preprocessing"]["size"])
    model = source.artifact.build_model()
    module = coreml_ready_module(model, size, config.format, input_channels(model))
    carry_file_weights(module, stored_weights(coreml_path), torch.zeros(1, input_channels(model), size, size))
    return module.eval()
