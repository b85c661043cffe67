"""``tbopt quantize`` around the transform: calibration images from files, the int8 TorchScript
file written atomically with its metadata, and the written model scored and timed against the
float one.

:func:`quantize_file` reads a checkpoint; :func:`quantize_loaded` starts from a model already in
memory (the pipeline's pruned model) and never re-reads its path. The quantization itself is
:func:`~tinybeauty_cli.quantize.transform.quantize_module`.
"""

from __future__ import annotations

import io
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import __version__
from ..core.artifact import HistoryStep, artifact_bytes
from ..core.checkpoint import LoadedModel, load_model
from ..core.contexts import quantized_engine
from ..core.counts import count_macs, count_parameters
from ..core.errors import ImageError, InputError, UnsupportedError
from ..core.files import check_output, normalized, zipped_size_of_bytes
from ..core.images import ImageSet, builtin_test_set, load_images, read_unlabeled, synthetic_unlabeled, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.sanity import require_finite_on
from ..core.written import WrittenFile, write_file
from ..measure.evaluate import Evaluation, Scores
from ..quantize.config import CALIB_BATCH, TORCHSCRIPT_FORMAT, TORCHSCRIPT_FORMAT_VERSION, QuantizeConfig
from ..quantize.engines import OBSERVERS
from ..quantize.graph_rewrites import RewriteReport
from ..quantize.lowering import quiet, torchscript_archive, torchscript_bytes
from ..quantize.results import BackendTrial, LayerDecision, LayerSplit, QuantizeOutcome, rounded
from ..quantize.transform import quantize_module
from ..runtime.plain_timing import allocator_hint, plain_process_latency
from ..runtime.runners import TorchRunner
from ..runtime.timing import measure_latencies


@dataclass
class QuantizeResult(LayerSplit):
    """What ``tbopt quantize`` did and measured; :meth:`to_dict` is its JSON output."""

    input: str
    output: str
    config: QuantizeConfig
    backend: str
    backend_reason: str
    engine: str
    backends: list[BackendTrial]
    rewrites: RewriteReport
    calibration: dict[str, Any]
    layers: list[LayerDecision]
    keep_float_steps: list[dict[str, Any]]
    size: dict[str, Any]
    quality: dict[str, Any]
    latency: dict[str, Any]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    ranking: dict[str, Any] = field(default_factory=dict)  # how engines were compared: threads, runs, float ms
    #: The written file as opened (the reloaded module, its metadata and hash); not part of ``to_dict``.
    written: LoadedModel | None = field(default=None, repr=False)
    #: The int8 file as written (bytes, hash, sizes); not part of ``to_dict``.
    file: WrittenFile | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "config": self.config.to_dict(),
            "backend": self.backend, "backend_reason": self.backend_reason, "engine": self.engine,
            "backends": [b.to_dict() for b in self.backends], "ranking": dict(self.ranking),
            "rewrites": self.rewrites.to_dict(), "calibration": dict(self.calibration),
            "quantized_layers": self.quantized_layers, "float_layers": self.float_layers,
            "layers": [layer.to_dict() for layer in self.layers], "keep_float_steps": list(self.keep_float_steps),
            "size": dict(self.size), "quality": dict(self.quality), "latency": dict(self.latency),
            "timings": {k: round(v, 2) for k, v in self.timings.items()}, "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# inputs


def refuse_unquantizable(loaded: LoadedModel) -> None:
    """Only float models with weights can be quantized."""
    if loaded.kind == "torchscript":
        if loaded.metadata.get("quantized"):
            raise InputError(f"{loaded.path} is already an int8 model ({loaded.metadata.get('engine', 'int8')}); "
                             f"quantizing it again would only lose quality",
                             hint="quantize the float checkpoint it was made from")
        raise UnsupportedError(f"{loaded.path} is a TorchScript archive; tbopt quantize needs the float weights",
                               hint="give the checkpoint or tbopt artifact the TorchScript was made from")
    if loaded.artifact is not None and any(getattr(v, "is_quantized", False) for v in loaded.artifact.state_dict.values()):
        raise InputError(f"{loaded.path} already holds quantized tensors", hint="quantize a float checkpoint")


def calibration_images(calib: Path | None, count: int, size: int, progress: Progress) -> tuple[ImageSet, list[str]]:
    """``count`` calibration images: from a folder (unreadable files skipped), or synthetic portraits.

    Returns the images and the names of skipped files. A folder of pairs
    (``input``/``target``) is calibrated on its inputs.
    """
    if calib is None:
        return synthetic_unlabeled(count, size, progress=progress), []
    images, skipped, files = read_unlabeled(Path(calib), size, count)
    if images is None:
        what = f"{files} image file(s), none readable" if files else "no image files"
        raise ImageError(f"calibration folder {calib} has no readable images ({what})",
                         hint="give --calib a folder of face photos (png, jpg, ...) or leave it out "
                              "to calibrate on synthetic portraits")
    arrays = images.inputs
    if skipped:
        progress.note(f"calibration: skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:3])}"
                      f"{' ...' if len(skipped) > 3 else ''}")
    if len(arrays) < count:
        progress.note(f"calibration: {calib} has {len(arrays)} readable image(s), fewer than --calib-count {count}")
    return ImageSet(images.names, arrays, None, f"{calib} ({len(arrays)} images)", images.labels), skipped


# ---------------------------------------------------------------------------------------------
# the command


def quantize_file(source: Path | str, output: Path | str, config: QuantizeConfig | None = None, *,
                  force: bool = False, progress: Progress | None = None, command: str = "",
                  arch: str | None = None, arch_kwargs: str | Mapping[str, Any] | None = None,
                  trust_pickle: bool = False, data: Path | None = None) -> QuantizeResult:
    """Quantize the float model in ``source`` to an int8 TorchScript file at ``output``; the report
    scores ``data`` (a folder; default: the built-in test set)."""
    t_start = time.perf_counter()
    source, output = Path(source), Path(output)
    cfg = config or QuantizeConfig()
    output = check_output(output, force, inputs=(source,))
    loaded = load_model(source, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    eval_images = None
    if data is not None:
        eval_images = load_images(Path(data), loaded.preprocessing.size, cfg.eval_limit, progress)
    result = _quantize(loaded, output, cfg, force=force, progress=progress, command=command,
                       eval_images=eval_images, scores=None, t_start=t_start)
    result.latency.update(plain_process_figures(output, result.latency, cfg))
    return result


def plain_process_figures(output: Path, latency: dict[str, Any], cfg: QuantizeConfig) -> dict[str, Any]:
    """The int8 file timed again as a plain Python process runs it (glibc's allocator as a process starts),
    beside the figure timed with freed memory kept, and the line that gives a process the faster one."""
    plain = plain_process_latency(output, runs=cfg.runs, warmup=cfg.warmup, threads=latency.get("threads"))
    return {"int8_plain_process_ms": plain["p50_ms"] if plain else None,
            "int8_timed_with": latency["int8"].get("allocator", ""), "faster_with": allocator_hint()}


def quantize_loaded(loaded: LoadedModel, output: Path | str, config: QuantizeConfig | None = None, *,
                    force: bool = False, progress: Progress | None = None, command: str = "",
                    eval_images: ImageSet | None = None, scores: Scores | None = None,
                    source_bytes: bytes | None = None) -> QuantizeResult:
    """Quantize a float model already in memory to an int8 TorchScript file at ``output``
    (which the caller has checked: an existing file is replaced only with ``force``).

    ``loaded.path`` is only named (in the result and the file's metadata), never read:
    ``loaded.sha256`` is used as given, and the float model's sizes are those of ``source_bytes``
    or ``loaded.content`` (its file as read or written; else its artifact made in memory).
    ``eval_images`` are scored for the report (default: the built-in test set, at most
    ``config.eval_limit`` images); with ``scores``, its images are scored instead and models it
    already ran are not run again.
    The result's ``written`` is the int8 file as :func:`load_model` would open it and ``file`` the
    file as written, so a flow can measure and describe it without reading it back.
    """
    return _quantize(loaded, normalized(output), config or QuantizeConfig(), force=force, progress=progress,
                     command=command, eval_images=eval_images, scores=scores, t_start=time.perf_counter(),
                     source_bytes=source_bytes)


def _quantize(loaded: LoadedModel, output: Path, cfg: QuantizeConfig, *, force: bool, progress: Progress | None,
              command: str, eval_images: ImageSet | None, scores: Scores | None, t_start: float,
              source_bytes: bytes | None = None) -> QuantizeResult:
    progress = progress or SilentProgress()
    timings: dict[str, float] = {}
    refuse_unquantizable(loaded)
    model, prep = loaded.module.eval(), loaded.preprocessing

    t0 = time.perf_counter()
    calib_set, skipped = calibration_images(cfg.calib, cfg.calib_count, prep.size, progress)
    calib = torch.from_numpy(uint8_to_model(calib_set.inputs))
    with progress.task("checking the float model on the calibration images", total=None):
        require_finite_on(loaded.path, model, calib, calib_set.image_labels())  # the ranges it observes must be finite
    timings["calibration_images_s"] = time.perf_counter() - t0

    script, outcome = quantize_module(model, cfg, calib, output=prep.output, progress=progress)
    timings.update(outcome.timings)
    calibration = {"source": calib_set.source, "images": len(calib_set), "skipped": skipped,
                   "batch": CALIB_BATCH, "sensitivity_images": outcome.sensitivity_images, "observers": OBSERVERS}

    # The archive is made, reloaded, measured and written from memory: the file is never read back.
    t0 = time.perf_counter()
    with quantized_engine(outcome.backend):
        saved = torchscript_bytes(script)
        with quiet():
            reloaded = torch.jit.load(io.BytesIO(torchscript_archive(saved, {})), map_location="cpu").eval()
        if scores is None:
            test = eval_images if eval_images is not None else builtin_test_set(prep.size, cfg.eval_limit, progress)
            scores = Scores(test, progress)
        measured = _measure(loaded, reloaded, outcome, cfg, scores, progress)
        timings["evaluation_s"] = time.perf_counter() - t0
        meta = _metadata(loaded, cfg, outcome, command, calibration, measured)
        file = write_file(output, torchscript_archive(saved, meta), force=force)
    written = LoadedModel(output, "torchscript", f"{meta['kind_description']} with tbopt metadata", file.sha256,
                          module=reloaded, metadata=meta, quantized_engine=outcome.backend, content=file.content)
    float_bytes = source_bytes or loaded.content or artifact_bytes(loaded.artifact)  # made in memory: as an artifact
    size = {"float_bytes": len(float_bytes),
            "float_zipped_bytes": zipped_size_of_bytes(float_bytes, Path(loaded.path).name), "int8_bytes": file.size_bytes, "int8_zipped_bytes": file.zipped_bytes}
    size["ratio"] = rounded(size["int8_bytes"] / size["float_bytes"])
    size["zipped_ratio"] = rounded(size["int8_zipped_bytes"] / size["float_zipped_bytes"])
    timings["total_s"] = time.perf_counter() - t_start
    return QuantizeResult(str(loaded.path), str(output), cfg, outcome.backend, outcome.backend_reason, outcome.engine,
                          outcome.backends, outcome.rewrites, calibration, outcome.layers, outcome.keep_float_steps,
                          size, measured.quality, measured.latency, timings,
                          list(outcome.notes) + _notes(measured, outcome, cfg), outcome.ranking,
                          written=written, file=file)


@dataclass
class _Measured:
    """The float and the int8 model scored on the same images and timed on one of them."""

    before: Evaluation
    after: Evaluation
    quality: dict[str, Any]
    latency: dict[str, Any]
    float_ms: float
    int8_ms: float


def _measure(loaded: LoadedModel, reloaded: torch.jit.ScriptModule, outcome: QuantizeOutcome, cfg: QuantizeConfig,
             scores: Scores, progress: Progress) -> _Measured:
    model, prep = loaded.module, loaded.preprocessing
    float_runner = TorchRunner(model, prep, loaded=loaded)
    int8_runner = TorchRunner(reloaded, prep, kind="int8", engine=outcome.engine, quantized_engine=outcome.backend)
    before = scores.score(model, float_runner, "scoring float model")
    after = scores.score(reloaded, int8_runner, "scoring int8 model", reference=before.outputs)
    x1 = uint8_to_model(scores.images.inputs[:1])
    with progress.task("timing float vs int8", total=None):
        lat = measure_latencies({"float": lambda: float_runner.predict(x1), "int8": lambda: int8_runner.predict(x1)},
                                runs=cfg.runs, warmup=cfg.warmup, threads=cfg.effective_threads)
    quality = {
        "images": scores.images.source,
        "float_target_psnr_db": rounded(before.target_psnr_db),
        "int8_target_psnr_db": rounded(after.target_psnr_db),
        "target_psnr_drop_db": (rounded(before.target_psnr_db - after.target_psnr_db)
                                if before.target_psnr_db is not None and after.target_psnr_db is not None
                                else None),  # images without targets (photos): fidelity only
        "fidelity_psnr_db": rounded(after.fidelity_psnr_db),
        "worst_fidelity_db": rounded(after.worst_fidelity_db),
        "calibration_fidelity_db": rounded(outcome.calibration_fidelity_db),
    }
    latency = {
        "float": lat["float"].to_dict(), "int8": lat["int8"].to_dict(),
        "float_engine": float_runner.engine, "int8_engine": int8_runner.engine,
        "ratio": rounded(lat["int8"].p50_ms / lat["float"].p50_ms),
        "threads": lat["int8"].threads, "batch": 1, "size": prep.size,
        "load_average": lat["int8"].load_average, "cpus": lat["int8"].cpus,
    }
    return _Measured(before, after, quality, latency, lat["float"].p50_ms, lat["int8"].p50_ms)


def _metadata(loaded: LoadedModel, cfg: QuantizeConfig, outcome: QuantizeOutcome, command: str,
              calibration: dict[str, Any], measured: _Measured) -> dict[str, Any]:
    """The ``tbopt.json`` the int8 archive carries: its history (this step's figures added), what it
    needs to load and run, and how it was made."""
    model, prep, quality = loaded.module, loaded.preprocessing, measured.quality
    params, nonzero = count_parameters(model)
    figures = {
        "backend": outcome.backend, "quantized_layers": len(outcome.quantized_layers),
        "float_layers": [d.name for d in outcome.layers if not d.quantized],
        "fidelity_psnr_db": quality["fidelity_psnr_db"],
        "float_target_psnr_db": quality["float_target_psnr_db"],
        "int8_target_psnr_db": quality["int8_target_psnr_db"],
        "float_latency_ms": rounded(measured.float_ms), "int8_latency_ms": rounded(measured.int8_ms),
        "threads": cfg.effective_threads, "ranking_threads": outcome.ranking.get("threads"),
    }
    step = HistoryStep.now("quantize", command, cfg.to_dict(), figures)
    return {
        "format": TORCHSCRIPT_FORMAT, "format_version": TORCHSCRIPT_FORMAT_VERSION, "tbopt_version": __version__,
        "kind_description": f"an int8 TorchScript model ({outcome.backend})",
        "quantized": True, "engine": outcome.engine, "quantized_engine": outcome.backend,
        "preprocessing": prep.to_dict(),
        "history": [h.to_dict() for h in loaded.history] + [step.to_dict()],
        "architecture": loaded.artifact.arch.describe() + ", int8",
        "arch": loaded.artifact.arch.to_dict(),
        "parameters": params, "nonzero_parameters": nonzero,
        "macs": outcome.macs, "float_macs": count_macs(model, prep.size),
        "stored_weights": outcome.stored_weights,
        "configuration": cfg.to_dict(),
        # the engine was chosen for this thread count: at another, another engine may be faster
        "ranking": dict(outcome.ranking),
        "calibration": calibration,
        "layers": [d.to_dict() for d in outcome.layers],
        "rewrites": outcome.rewrites.to_dict(),
        "source": {"path": str(loaded.path), "sha256": loaded.sha256, "found": loaded.found},
        "requires": {"torch": torch.__version__.split("+")[0],
                     "load": f"torch.backends.quantized.engine = '{outcome.backend}' before torch.jit.load",
                     "input": f"float32 (N, 3, {prep.size}, {prep.size}) in [-1, 1]; " + (
                         "returns the residual r; the image is clamp(x + r, -1, 1)"
                         if prep.output == "residual" else "returns the made-up image")},
        "measured_on": {"cpu": platform.processor() or platform.machine(),
                        "vnni": bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())},
    }


def _notes(measured: _Measured, outcome: QuantizeOutcome, cfg: QuantizeConfig) -> list[str]:
    notes = []
    fidelity = measured.after.fidelity_psnr_db
    if fidelity is not None and fidelity < cfg.min_psnr_db:
        notes.append(f"fidelity on the test set ({fidelity:.2f} dB) is below --min-fidelity "
                     f"{cfg.min_psnr_db:g} dB although the calibration images reached "
                     f"{outcome.calibration_fidelity_db:.2f} dB; calibrate on images closer to the test set (--calib)")
    if measured.int8_ms >= measured.float_ms:
        notes.append("the int8 model measured no faster than the float model in this run; the machine may be "
                     "loaded (check uptime and re-run tbopt bench)")
    return notes
