"""``tbopt run``: the whole chain original -> pruned -> int8 -> Core ML, measured, into one folder.

This is the original plan's ``python model_optimization.py``, done with tbopt's own stages:

1. prune     (:mod:`.prune`)     -> ``tinybeauty_pruned.pt``    (float tbopt artifact)
2. quantize  (:mod:`.quantize`)  -> ``tinybeauty_optimized.pt`` (int8 TorchScript, from the pruned model)
3. export    (:mod:`.export`)    -> ``TinyBeauty.mlmodel`` (NeuralNetwork, iOS 13+) and
                                    ``TinyBeauty.mlpackage`` (ML Program), both from the pruned model
4. measure   (``measure.bench``) every artifact on the same images: size, PSNR, fidelity, latency
5. report    -> ``results.json``, ``results.md``, ``optimization_results.png``

The models pass from stage to stage in memory: the checkpoint is read once, the outputs are
checked once before any work, and each model runs once on the evaluation images (the scores a
stage's report needs are the ones the final table shows). Every file is written atomically, so
an interrupted run leaves no half-written file; a stage that fails says which it was and leaves
what the earlier stages wrote in place.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..core.artifact import ARTIFACT_VERSION, artifact_found
from ..core.checkpoint import LoadedModel, load_model
from ..core.contexts import torch_threads
from ..core.errors import InputError, OutputError, OutputExistsError, TbOptError, UsageError
from ..core.files import atomic_output, check_folder, folder_lock, normalized
from ..core.images import load_images
from ..core.progress import Progress, SilentProgress
from ..core.load import highest, load_text, overload_note
from ..measure.bench import BenchResult, BenchRow, Entry, measure_entries
from ..measure.evaluate import Evaluation, Scores
from ..measure.report import StageFigures, results_figure, results_markdown
from ..prune.report import PruneReport
from ..runtime.runners import TorchRunner, open_runner, runner_for
from .export import ExportResult, export_loaded
from .prune import prune_loaded, write_pruned
from .quantize import QuantizeResult, quantize_loaded
from .run_config import OUTPUT_FILES, RUN_VERSION, STAGES, RunConfig

#: How many example faces the picture shows.
EXAMPLES = 3

T = TypeVar("T")


class StageError(TbOptError):
    """A stage failed; the message names it and the files the earlier stages left."""

    def __init__(self, stage: str, number: int, total: int, exc: BaseException, kept: list[str], out: Path):
        reason = str(exc) if isinstance(exc, TbOptError) else f"internal error: {type(exc).__name__}: {exc}"
        kept_text = (f"kept from earlier stages in {out}/: {', '.join(kept)}" if kept
                     else "nothing was written")
        super().__init__(f"stage {number}/{total} ({stage}) failed: {reason} ({kept_text})",
                         hint=getattr(exc, "hint", None))
        self.stage = stage
        self.exit_code = getattr(exc, "exit_code", 1)


@dataclass
class RunResult:
    """What ``tbopt run`` prints and writes into ``results.json``."""

    checkpoint: str
    out: str
    config: RunConfig
    stages: list[StageFigures]
    bench: BenchResult
    prune: PruneReport
    quantize: QuantizeResult
    exports: dict[str, ExportResult]
    seconds: dict[str, float]
    files: dict[str, str]
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def checks(self) -> dict[str, Any]:
        """The plan's targets, each with the measured figure: the .mlmodel size, PSNR kept."""
        orig = self.stages[0]
        mlmodel = next(s for s in self.stages if s.stage == "CoreML")
        out: dict[str, Any] = {"mlmodel_under_100kb": mlmodel.size_bytes < 100_000,
                               "mlmodel_bytes": mlmodel.size_bytes}
        if orig.target_psnr_db is not None:
            drops = {s.stage: round(orig.target_psnr_db - s.target_psnr_db, 3)
                     for s in self.stages[1:] if s.target_psnr_db is not None}
            out["psnr_drop_db"] = drops
            out["psnr_within_0p3_db"] = all(d <= 0.3 for d in drops.values())
        out["fidelity_db"] = {s.stage: s.fidelity_psnr_db for s in self.stages[1:]}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tbopt_version": __version__,
            "run_version": RUN_VERSION,
            "command": self.command,
            "checkpoint": self.checkpoint,
            "out": self.out,
            "config": self.config.to_dict(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "torch": torch.__version__, "threads": self.config.effective_threads},
            "data": self.bench.data_source,
            "table": [s.to_dict() for s in self.stages],
            "checks": self.checks(),
            "files": self.files,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "bench": self.bench.to_dict(),
            "prune": self.prune.to_dict(),
            "quantize": self.quantize.to_dict(),
            "export": {k: v.to_dict() for k, v in self.exports.items()},
            "notes": list(self.notes),
        }


def _shown(path: Path) -> str:
    """A path as a user would type it: relative to the current folder when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def output_paths(out: Path) -> dict[str, Path]:
    return {role: out / name for role, name in OUTPUT_FILES.items()}


def check_outputs(out: Path, checkpoint: Path, force: bool) -> dict[str, Path]:
    """Refuse, before any work, an output folder that is a file, holds the input, or has earlier outputs."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file, not a folder")
    check_folder(out, what="run's outputs")
    paths = output_paths(out)
    if any(p.resolve() == checkpoint.resolve() for p in paths.values()):
        raise InputError(f"{checkpoint} is one of the files the run writes; inputs are never modified",
                         hint="choose another --output folder")
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not force:
        raise OutputExistsError(f"{out}/{existing[0]}" + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""))
    return paths


def _row_figures(stage: str, row: BenchRow) -> StageFigures:
    lat = row.latency
    return StageFigures(stage=stage, artifact=row.name, engine=row.engine, size_bytes=row.size_bytes,
                        zipped_bytes=row.zipped_bytes, target_psnr_db=row.target_psnr_db,
                        fidelity_psnr_db=float("inf") if row.is_reference else row.fidelity_psnr_db,
                        latency_ms=None if lat is None else lat.p50_ms,
                        latency_p90_ms=None if lat is None else lat.p90_ms)


def run_load(result: RunResult) -> float | None:
    """The highest load average while the run timed its artifacts."""
    return highest(r.latency for r in result.bench.rows)


def caption(result: RunResult) -> str:
    b = result.bench
    cfg = b.config
    return (f"Measured by `{result.command}` on {b.data_source}. PSNR against the targets; fidelity = PSNR "
            f"against the original model's output. Inference time: batch 1, {cfg.effective_threads} CPU "
            f"thread(s), median of {cfg.runs} runs after {cfg.warmup} warm-up, on this machine "
            f"({platform.machine()}, {load_text(run_load(result))}); the engine of each time is stated. Core ML times from tbopt's reference "
            f"executor are not device latency: that needs Apple hardware.")


def run_pipeline(checkpoint: Path | str, out: Path | str, config: RunConfig | None = None, *,
                 force: bool = False, progress: Progress | None = None,
                 on_stage: Callable[[int, int, str], None] | None = None) -> RunResult:
    """Run every stage into ``out`` and return the measured table (see the module docstring)."""
    cfg = config or RunConfig()
    progress = progress or SilentProgress()
    checkpoint, out = Path(checkpoint), normalized(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file, not a folder")
    check_folder(out, what="run's outputs")
    with folder_lock(out, f"tbopt run --output {out}"):  # the folder made for it goes if nothing is written
        return _locked_run(checkpoint, out, cfg, force, progress, on_stage)


def _locked_run(checkpoint: Path, out: Path, cfg: RunConfig, force: bool, progress: Progress,
                on_stage: Callable[[int, int, str], None] | None) -> RunResult:
    paths = check_outputs(out, checkpoint, force)
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise InputError(f"--data {cfg.data} is not a folder")
    if cfg.calib is not None and not Path(cfg.calib).is_dir():
        raise InputError(f"--calib {cfg.calib} is not a folder")
    loaded = load_model(checkpoint, **cfg.model_options())  # a bad checkpoint is refused before the folder is made
    if loaded.kind != "float":
        raise UsageError(f"{checkpoint} is a {loaded.kind} model; tbopt run starts from a float checkpoint")
    return _Run(loaded, checkpoint, out, cfg, paths, force, progress, on_stage,
                cfg.command_line(_shown(checkpoint), _shown(out))).all_stages()


STAGE_NAMES = ["prune", "quantize", "export", "measure", "report"]


@dataclass
class _Run:
    """One ``tbopt run``: its inputs, the time each stage took and the files written so far (named
    in the error when a later stage fails)."""

    loaded: LoadedModel
    checkpoint: Path
    out: Path
    cfg: RunConfig
    paths: dict[str, Path]
    force: bool
    progress: Progress
    on_stage: Callable[[int, int, str], None] | None
    command: str
    seconds: dict[str, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)

    def stage(self, number: int, fn: Callable[[], T]) -> T:
        """``fn()`` as stage ``number``: announced, timed, and a failure reported with its stage."""
        name = STAGE_NAMES[number - 1]
        if self.on_stage is not None:
            self.on_stage(number, len(STAGE_NAMES), name)
        t0 = time.perf_counter()
        try:
            result = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported with its stage
            raise StageError(name, number, len(STAGE_NAMES), exc, list(self.kept), self.out) from exc
        self.seconds[name] = time.perf_counter() - t0
        return result

    def note_kept(self, role: str, result: T) -> T:
        """Record that the output ``role`` was written (``result`` passes through)."""
        self.kept.append(OUTPUT_FILES[role])
        return result

    def all_stages(self) -> RunResult:
        cfg, paths, progress = self.cfg, self.paths, self.progress
        with torch_threads(cfg.threads):
            # The evaluation images, loaded once; every model is run on them once (see Scores).
            scores = Scores(load_images(cfg.data, self.loaded.preprocessing.size, cfg.limit, progress), progress)
            pruned_report, pruned = self.stage(1, lambda: self.prune(scores))
            quantized = self.stage(2, lambda: self.note_kept("quantized", quantize_loaded(
                pruned, paths["quantized"], cfg.quantize_config(), force=self.force, progress=progress,
                command=self.command, scores=scores)))
            exports = self.stage(3, lambda: {role: self.note_kept(role, export_loaded(
                pruned, paths[role], cfg.export_config(role), force=self.force, progress=progress))
                for role in ("mlmodel", "mlpackage")})
            measured = self.stage(4, lambda: self.measure(pruned, quantized, exports, scores))
            stages = [_row_figures(label, row) for (label, _), row in zip(STAGES, measured.rows)]
            files = {role: str(p) for role, p in paths.items()}
            result = RunResult(str(self.checkpoint), str(self.out), cfg, stages, measured, pruned_report, quantized,
                               exports, self.seconds, files, notes=list(measured.notes), command=self.command)
            if note := overload_note(run_load(result)):
                result.notes.append(note)
            self.stage(5, lambda: _write_reports(result, paths, self.force))
            self.seconds["total"] = time.perf_counter() - self.t_start
            _write_json(result, paths["json"])  # last, so that it holds every stage's time
            return result

    def prune(self, scores: Scores) -> tuple[PruneReport, LoadedModel]:
        """Prune in memory, write the artifact, and the pruned model as if opened from its bytes."""
        prep = self.loaded.preprocessing

        def score_module(module: nn.Module, reference: np.ndarray | None, description: str) -> Evaluation:
            return scores.score(module, TorchRunner(module.eval(), prep), description, reference)

        artifact, module, report = prune_loaded(self.loaded, self.cfg.prune_config(), data=self.cfg.calib,
                                                eval_images=scores.images, progress=self.progress,
                                                scorer=score_module)
        file = self.note_kept("pruned", write_pruned(artifact, self.loaded, report, self.paths["pruned"],
                                                     force=self.force))
        pruned = LoadedModel(file.path, "float", artifact_found(ARTIFACT_VERSION, artifact), file.sha256,
                             artifact=artifact, module=module, content=file.content)
        return report, pruned

    def measure(self, pruned: LoadedModel, quantized: QuantizeResult, exports: dict[str, ExportResult],
                scores: Scores) -> BenchResult:
        """Every model on the run's images: the PyTorch ones as they are in memory (keyed by module:
        the scores prune and quantize took are reused, not re-run), the Core ML files opened once;
        sizes from the files as written."""
        int8, paths = quantized.written, self.paths
        entries = [Entry(self.checkpoint, runner_for(self.loaded), key=self.loaded.module),
                   Entry(paths["pruned"], runner_for(pruned), key=pruned.module),
                   Entry(paths["quantized"], runner_for(int8), key=int8.module, written=quantized.file)]
        entries += [Entry(paths[role], open_runner(paths[role]), written=exports[role].file)
                    for role in ("mlmodel", "mlpackage")]
        return measure_entries(entries, self.cfg.bench_config(), ref_path=self.checkpoint, scores=scores,
                               progress=self.progress, keep_examples=EXAMPLES)


def _write_json(result: RunResult, path: Path) -> None:
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")


def _write_reports(result: RunResult, paths: dict[str, Path], force: bool) -> None:
    with atomic_output(paths["markdown"], force=force) as tmp:
        tmp.write_text(f"# tbopt run\n\n{results_markdown(result.stages, caption(result))}")
    ex = result.bench.examples
    columns = ["input"] + [s.stage for s in result.stages] + (["target"] if ex["targets"] is not None else [])
    examples = []
    for i, name in enumerate(ex["names"]):
        row = [ex["inputs"][i]] + [o[i] for o in ex["outputs"]]
        if ex["targets"] is not None:
            row.append(ex["targets"][i])
        examples.append((name, row))
    title = (f"TinyBeauty stage 5: {result.config.method} pruning {result.config.rate:g}, int8, Core ML "
             f"({result.bench.data_source})\ninference times at {load_text(run_load(result))}")
    with atomic_output(paths["figure"], force=force) as tmp:
        results_figure(result.stages, examples, columns, tmp, title)
