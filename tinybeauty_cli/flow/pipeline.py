"""``tbopt run``: the whole chain original -> pruned -> int8 -> Core ML, measured, into one folder.

This is the original plan's ``python model_optimization.py``, done with tbopt's own stages:

1. prune     (:mod:`.prune`)     -> ``tinybeauty_pruned.pt``    (float tbopt artifact)
2. quantize  (:mod:`.quantize`)  -> ``tinybeauty_optimized.pt`` (int8 TorchScript, from the pruned model)
3. export    (:mod:`.export`)    -> ``TinyBeauty.mlmodel`` (NeuralNetwork, iOS 13+) and
                                    ``TinyBeauty.mlpackage`` (ML Program), both from the pruned model
4. measure   (:mod:`.bench`)     every artifact on the same images: size, PSNR, fidelity, latency
5. report    -> ``results.json``, ``results.md``, ``optimization_results.png``

Every file is written atomically, so an interrupted run leaves no half-written file; a
stage that fails says which it was and leaves what the earlier stages wrote in place.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .. import __version__
from ..measure.bench import BenchConfig, BenchResult, BenchRow, bench
from ..core.checkpoint import load_model
from ..core.errors import InputError, OutputExistsError, TbOptError, UsageError
from ..export._all import ExportConfig, ExportResult, export_model
from ..core.files import atomic_output
from ..runtime.contexts import torch_threads
from ..core.progress import Progress, SilentProgress
from ..prune._all import PruneConfig, PruneReport, prune
from ..quantize._all import QuantizeConfig, QuantizeResult, quantize_model
from ..measure.report import StageFigures, results_figure, results_markdown

RUN_VERSION = 1

#: The files a run writes into its output folder, by role.
OUTPUT_FILES = {
    "pruned": "tinybeauty_pruned.pt",
    "quantized": "tinybeauty_optimized.pt",
    "mlmodel": "TinyBeauty.mlmodel",
    "mlpackage": "TinyBeauty.mlpackage",
    "json": "results.json",
    "markdown": "results.md",
    "figure": "optimization_results.png",
}

#: The rows of the original plan's table, and the file each one measures.
STAGES = (("Original", None), ("Pruned", "pruned"), ("Quantized", "quantized"), ("CoreML", "mlmodel"),
          ("CoreML package", "mlpackage"))

#: How many example faces the picture shows.
EXAMPLES = 3

T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``tbopt run`` can be told; ``to_dict`` goes into ``results.json``."""

    rate: float = 0.3
    method: str = "magnitude"  # the original plan's rule; "channel" for a smaller, faster network
    finetune_steps: int | None = None  # None: the pruning method's default
    weights: str = "int8"  # Core ML weight storage of TinyBeauty.mlmodel
    package_weights: str | None = None  # ... and of TinyBeauty.mlpackage (None: the same)
    data: Path | None = None  # images scored in the table (default: the built-in test set)
    calib: Path | None = None  # unlabeled images for channel ranking, distillation and int8 calibration
    limit: int | None = None
    calib_count: int = 32
    backend: str = "auto"  # int8 engine (tbopt quantize --backend)
    #: int8 fidelity to reach against the pruned float model. Higher than tbopt quantize's own
    #: default (45 dB): int8 noise adds to the model's own error, and on a model that scores
    #: ~39 dB against its targets, 45 dB of it costs ~0.3 dB there; 50 dB costs ~0.1 dB.
    min_psnr_db: float = 50.0
    threads: int | None = None
    runs: int = 30
    warmup: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        # Each stage checks its own options; building them here refuses bad ones before any work.
        self.prune_config()
        self.quantize_config()
        self.export_config("mlmodel")
        self.export_config("mlpackage")
        self.bench_config()

    def prune_config(self) -> PruneConfig:
        return PruneConfig(rate=self.rate, method=self.method, finetune_steps=self.finetune_steps, seed=self.seed)

    def quantize_config(self) -> QuantizeConfig:
        return QuantizeConfig(backend=self.backend, calib=self.calib, calib_count=self.calib_count,
                              min_psnr_db=self.min_psnr_db, threads=self.threads,
                              runs=self.runs, warmup=self.warmup, eval_limit=self.limit)

    def export_config(self, role: str) -> ExportConfig:
        weights = self.weights if role == "mlmodel" else (self.package_weights or self.weights)
        return ExportConfig(format="neuralnetwork" if role == "mlmodel" else "mlprogram",
                            weights=None if weights == "fp16" else weights)

    def bench_config(self) -> BenchConfig:
        return BenchConfig(data=self.data, limit=self.limit, runs=self.runs, warmup=self.warmup,
                           threads=self.threads)

    @property
    def effective_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("data", "calib"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["finetune_steps"] = self.prune_config().steps
        d["package_weights"] = self.package_weights or self.weights
        d["threads"] = self.effective_threads
        d["version"] = RUN_VERSION
        return d

    def command_line(self, checkpoint: str, out: str) -> str:
        parts = [f"tbopt run {checkpoint} --out {out} --rate {self.rate:g} --method {self.method}",
                 f"--weights {self.weights}"]
        if self.package_weights:
            parts.append(f"--package-weights {self.package_weights}")
        if self.finetune_steps is not None:
            parts.append(f"--finetune-steps {self.finetune_steps}")
        for opt, name in (("--data", "data"), ("--calib", "calib"), ("--limit", "limit"), ("--threads", "threads"),
                          ("--calib-count", "calib_count"), ("--backend", "backend"), ("--min-psnr", "min_psnr_db"),
                          ("--runs", "runs")):
            value = getattr(self, name)
            if value != getattr(RunConfig, name):  # only what differs from the defaults
                parts.append(f"{opt} {value}")
        return " ".join(parts)


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
        raise InputError(f"--out {out} is a file, not a folder")
    paths = output_paths(out)
    if any(p.resolve() == checkpoint.resolve() for p in paths.values()):
        raise InputError(f"{checkpoint} is one of the files the run writes; inputs are never modified",
                         hint="choose another --out folder")
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


def caption(result: RunResult) -> str:
    b = result.bench
    cfg = b.config
    return (f"Measured by `{result.command}` on {b.data_source}. PSNR against the targets; fidelity = PSNR "
            f"against the original model's output. Inference time: batch 1, {cfg.effective_threads} CPU "
            f"thread(s), median of {cfg.runs} runs after {cfg.warmup} warm-up, on this machine "
            f"({platform.machine()}); the engine of each time is stated. Core ML times from tbopt's reference "
            f"executor are not device latency: that needs Apple hardware.")


def run_pipeline(checkpoint: Path | str, out: Path | str, config: RunConfig | None = None, *,
                 force: bool = False, progress: Progress | None = None,
                 on_stage: Callable[[int, int, str], None] | None = None) -> RunResult:
    """Run every stage into ``out`` and return the measured table (see the module docstring)."""
    cfg = config or RunConfig()
    progress = progress or SilentProgress()
    checkpoint, out = Path(checkpoint), Path(out)
    paths = check_outputs(out, checkpoint, force)
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise InputError(f"--data {cfg.data} is not a folder")
    if cfg.calib is not None and not Path(cfg.calib).is_dir():
        raise InputError(f"--calib {cfg.calib} is not a folder")
    loaded = load_model(checkpoint)  # a bad checkpoint is refused before the folder is made
    if loaded.kind != "float":
        raise UsageError(f"{checkpoint} is a {loaded.kind} model; tbopt run starts from a float checkpoint")
    command = cfg.command_line(_shown(checkpoint), _shown(out))

    names = ["prune", "quantize", "export", "measure", "report"]
    seconds: dict[str, float] = {}
    kept: list[str] = []

    def stage(number: int, fn: Callable[[], T]) -> T:
        name = names[number - 1]
        if on_stage is not None:
            on_stage(number, len(names), name)
        t0 = time.perf_counter()
        try:
            result = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported with its stage
            raise StageError(name, number, len(names), exc, list(kept), out) from exc
        seconds[name] = time.perf_counter() - t0
        return result

    def write(role: str, result: T) -> T:
        kept.append(OUTPUT_FILES[role])
        return result

    t_start = time.perf_counter()
    with torch_threads(cfg.threads):
        out.mkdir(parents=True, exist_ok=True)
        pruned = stage(1, lambda: write("pruned", prune(
            checkpoint, cfg.prune_config(), output=paths["pruned"], force=force, data=cfg.calib,
            eval_data=cfg.data, eval_limit=cfg.limit, progress=progress)))

        quantized = stage(2, lambda: write("quantized", quantize_model(
            paths["pruned"], paths["quantized"], cfg.quantize_config(), force=force, progress=progress,
            command=command)))

        def export_both() -> dict[str, ExportResult]:
            results = {}
            for role in ("mlmodel", "mlpackage"):
                results[role] = write(role, export_model(paths["pruned"], paths[role], cfg.export_config(role),
                                                         force=force, progress=progress))
            return results

        exports = stage(3, export_both)

        measured = stage(4, lambda: bench(
            [checkpoint] + [paths[role] for _, role in STAGES[1:]], cfg.bench_config(), ref=checkpoint,
            progress=progress, keep_examples=EXAMPLES))

        stages = [_row_figures(label, row) for (label, _), row in zip(STAGES, measured.rows)]
        files = {role: str(p) for role, p in paths.items()}
        result = RunResult(str(checkpoint), str(out), cfg, stages, measured, pruned, quantized, exports, seconds,
                           files, notes=list(measured.notes), command=command)
        stage(5, lambda: _write_reports(result, paths, force))
        seconds["total"] = time.perf_counter() - t_start
        _write_json(result, paths["json"])  # last, so that it holds every stage's time
        return result


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
             f"({result.bench.data_source})")
    with atomic_output(paths["figure"], force=force) as tmp:
        results_figure(result.stages, examples, columns, tmp, title)
