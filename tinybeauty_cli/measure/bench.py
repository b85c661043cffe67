"""``tbopt bench``: size, quality and speed of any mix of artifacts, on the same images."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.contexts import torch_threads
from ..core.errors import ConfigError
from ..core.images import load_images, model_to_uint8, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.quality import fidelity_psnr_db, worst_fidelity_db
from ..core.runner import Runner
from ..core.written import WrittenFile
from ..runtime.plain_timing import PLAIN_ALLOCATOR, allocator_hint, plain_process_latency
from ..runtime.runners import open_runner
from ..runtime.timing import Latency, measure_latency
from .describe import describe
from .evaluate import Scores, score_outputs
from .metrics import SsimReference

BENCH_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    data: Path | None = None
    limit: int | None = None
    runs: int = 30
    warmup: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ConfigError(f"--runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")

    @property
    def effective_threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data) if self.data else None
        d["threads"] = self.effective_threads
        d["version"] = BENCH_VERSION
        return d


@dataclass
class BenchRow:
    name: str
    path: str
    kind: str
    engine: str
    size_bytes: int
    zipped_bytes: int
    parameters: int | None
    nonzero_parameters: int | None
    macs: int | None
    images: int
    target_psnr_db: float | None
    fidelity_psnr_db: float | None
    worst_fidelity_db: float | None
    ssim: float | None
    latency: Latency | None
    is_reference: bool = False
    #: int8 TorchScript, timed: the median a plain Python process gets (glibc's allocator as a process
    #: starts), beside ``latency`` timed with freed memory kept; None for other rows or when not timed
    plain_process_p50_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "latency"}
        for k in ("target_psnr_db", "fidelity_psnr_db", "worst_fidelity_db", "ssim"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 4 if k == "ssim" else 3)
        lat = self.latency
        d.update({
            "size_kb": round(self.size_bytes / 1000, 2),
            "zipped_kb": round(self.zipped_bytes / 1000, 2),
            "latency_p50_ms": None if lat is None else round(lat.p50_ms, 3),
            "latency_p90_ms": None if lat is None else round(lat.p90_ms, 3),
            "images_per_second": None if lat is None else round(lat.images_per_second, 2),
            "latency_timed_with": None if lat is None else lat.allocator,
            "plain_process_timed_with": None if self.plain_process_p50_ms is None else PLAIN_ALLOCATOR,
            "threads": None if lat is None else lat.threads,
            "timing_runs": None if lat is None else lat.runs,
            "load_average": None if lat is None else lat.load_average,
            "cpus": None if lat is None else lat.cpus,
        })
        return d


@dataclass
class BenchResult:
    rows: list[BenchRow]
    data_source: str
    reference: str
    config: BenchConfig
    notes: list[str] = field(default_factory=list)
    #: With ``bench(..., keep_examples=K)``: the first K images (uint8 NHWC) -- "inputs", "targets"
    #: (None without targets) and one "outputs" array per row. Not part of ``to_dict``.
    examples: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"data": self.data_source, "reference": self.reference, "config": self.config.to_dict(),
             "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes)}
        if self.plain_process_rows:
            d["faster_with"] = allocator_hint()
        return d

    @property
    def plain_process_rows(self) -> list[BenchRow]:
        return [r for r in self.rows if r.plain_process_p50_ms is not None]

    def plain_process_note(self) -> str | None:
        """Which latency is which for int8 files, and the line that gives a user's process the faster one."""
        rows = self.plain_process_rows
        if not rows:
            return None
        timed = [r for r in rows if r.latency is not None]
        figures = ", ".join(f"{r.name} {r.latency.p50_ms:.2f} ms kept, {r.plain_process_p50_ms:.2f} ms plain"
                            for r in timed)
        kept_faster = all(r.latency.p50_ms < r.plain_process_p50_ms for r in timed)
        how = ("for the faster one in your own process" if kept_faster else
               "to run your own process as p50 was timed (not faster here)")
        return (f"int8 latency: p50 is timed with {timed[0].latency.allocator}; 'plain p50' is what a plain "
                f"Python process gets with glibc's allocator as it starts ({figures}); {how}: {allocator_hint()}")


class _ScoreSets:
    """One image set, and the scores of the models run on it, per model size (artifacts exported at
    another size get their own set)."""

    def __init__(self, cfg: BenchConfig, progress: Progress, given: Scores | None = None):
        self.cfg = cfg
        self.progress = progress
        self.sets: dict[int, Scores] = {}
        if given is not None:
            self.sets[given.images.inputs.shape[1]] = given

    def get(self, size: int) -> Scores:
        if size not in self.sets:
            self.sets[size] = Scores(load_images(self.cfg.data, size, self.cfg.limit, self.progress), self.progress)
        return self.sets[size]


def time_runner(runner: Runner, image: np.ndarray, cfg: BenchConfig, progress: Progress,
                label: str = "timing") -> Latency:
    """Batch-1 latency of ``runner.predict`` on one image: warm-up, then the median of ``runs``."""
    x = uint8_to_model(image[None])
    with progress.task(label, total=cfg.runs) as advance:
        return measure_latency(lambda: runner.predict(x), runs=cfg.runs, warmup=cfg.warmup,
                               threads=cfg.effective_threads, on_run=advance)


@dataclass
class Entry:
    """An artifact to measure: its file (sizes, description; ``written``: as the command wrote it),
    how it runs, and the model it runs (the key its scores are kept under; the runner itself when
    not given)."""

    path: Path
    runner: Runner
    key: object = None
    written: WrittenFile | None = None

    @property
    def score_key(self) -> object:
        return self.runner if self.key is None else self.key


def bench(paths: list[Path], cfg: BenchConfig, *, ref: Path | None = None, time_models: bool = True,
          progress: Progress | None = None, keep_examples: int = 0, plain_process: bool = True,
          **open_options: Any) -> BenchResult:
    """Open and measure every artifact in ``paths`` on the same images (see :func:`measure_entries`).

    ``ref`` is the artifact fidelity is measured against (default: the first of ``paths``).
    """
    if not paths:
        raise ConfigError("no artifacts to benchmark")
    with torch_threads(cfg.effective_threads):
        entries = [Entry(Path(p), open_runner(p, **open_options)) for p in paths]  # every file opens first
        ref_path = Path(ref or paths[0])
        reference = None
        if ref is not None and all(ref_path.resolve() != e.path.resolve() for e in entries):
            reference = Entry(ref_path, open_runner(ref_path, **open_options))
        return measure_entries(entries, cfg, reference=reference, ref_path=ref_path, time_models=time_models,
                               progress=progress, keep_examples=keep_examples, plain_process=plain_process)


def measure_entries(entries: list[Entry], cfg: BenchConfig, *, ref_path: Path, reference: Entry | None = None,
                    scores: Scores | None = None, time_models: bool = True, progress: Progress | None = None,
                    keep_examples: int = 0, plain_process: bool = False) -> BenchResult:
    """Score and time opened artifacts on the same images.

    Fidelity is measured against the entry whose path is ``ref_path``, or against ``reference``
    when it is not one of ``entries``. ``scores`` holds images (and models already run on them)
    to reuse. ``keep_examples=K`` keeps K images spread over the set and every artifact's outputs on
    them (:attr:`BenchResult.examples`), e.g. for a picture of the results. ``plain_process``: time each
    int8 TorchScript file again in a fresh process (:func:`.plain_process_latency`), as a user's gets it.
    """
    progress = progress or SilentProgress()
    sets = _ScoreSets(cfg, progress, scores)
    with torch_threads(cfg.effective_threads):
        notes: list[str] = [n for e in entries for n in getattr(e.runner, "notes", ())]
        outputs = [sets.get(e.runner.size).outputs(e.score_key, e.runner, f"scoring {e.path.name}")
                   for e in entries]
        if reference is not None:
            ref_outputs = sets.get(reference.runner.size).outputs(
                reference.score_key, reference.runner, f"scoring {reference.path.name} (reference)")
            ref_size = reference.runner.size
        else:
            idx = next(i for i, e in enumerate(entries) if e.path.resolve() == ref_path.resolve())
            ref_outputs, ref_size = outputs[idx], entries[idx].runner.size
        ssim_ref: SsimReference | None = None  # built at the first model compared with the reference

        rows = []
        for e, out in zip(entries, outputs):
            runner = e.runner
            images = sets.get(runner.size).images
            ev = score_outputs(out, images)
            fid = worst = ss = None
            is_ref = reference is None and e.path.resolve() == ref_path.resolve()
            if runner.size == ref_size and not is_ref:
                fid = fidelity_psnr_db(out, ref_outputs)
                worst = worst_fidelity_db(out, ref_outputs)
                ssim_ref = ssim_ref or SsimReference(model_to_uint8(ref_outputs))
                ss = float(np.mean(ssim_ref.score(model_to_uint8(out))))
            elif runner.size != ref_size:
                notes.append(f"{e.path.name} runs at {runner.size}px, the reference at {ref_size}px: no fidelity")
            latency = plain_ms = None
            if time_models:
                latency = time_runner(runner, images.inputs[0], cfg, progress, f"timing {e.path.name}")
                if plain_process and runner.kind == "int8" and e.path.is_file():
                    with progress.task(f"timing {e.path.name} in a plain process", total=None):
                        plain = plain_process_latency(e.path, runs=cfg.runs, warmup=cfg.warmup,
                                                      threads=cfg.effective_threads)
                    plain_ms = plain["p50_ms"] if plain else None
                    if plain is None:
                        notes.append(f"{e.path.name}: the plain-process timing failed; only the figure with "
                                     "freed memory kept is given")
            info = describe(e.path, runner=runner, written=e.written)
            rows.append(BenchRow(
                name=e.path.name, path=str(e.path), kind=runner.kind, engine=runner.engine,
                size_bytes=info["size_bytes"], zipped_bytes=info["zipped_bytes"],
                parameters=info.get("parameters"), nonzero_parameters=info.get("nonzero_parameters"),
                macs=info.get("macs"), images=len(out), target_psnr_db=ev.target_psnr_db,
                fidelity_psnr_db=fid, worst_fidelity_db=worst, ssim=ss, latency=latency,
                is_reference=is_ref, plain_process_p50_ms=plain_ms,
            ))
        if any(e.runner.off_device for e in entries):
            notes.append("Core ML times measured with tbopt's reference executor on this CPU are not "
                         "device latency; Core ML latency needs Apple hardware (run bench on a Mac).")
        first = sets.get(entries[0].runner.size).images
        examples: dict[str, Any] = {}
        if keep_examples > 0:  # spread over the set: neighbours in a folder tend to look alike
            k = np.unique(np.linspace(0, len(first) - 1, min(keep_examples, len(first))).round().astype(int))
            examples = {"names": [first.names[i] for i in k], "inputs": first.inputs[k],
                        "targets": None if first.targets is None else first.targets[k],
                        "outputs": [model_to_uint8(out[k]) for out in outputs]}
        return BenchResult(rows, first.source, str(ref_path), cfg, notes, examples)


def to_csv(result: BenchResult) -> str:
    import csv
    import io

    rows = [r.to_dict() for r in result.rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


MARKDOWN_COLUMNS = [
    ("artifact", "name"), ("engine", "engine"), ("size (KB)", "size_kb"), ("zipped (KB)", "zipped_kb"),
    ("params", "parameters"), ("non-zero", "nonzero_parameters"), ("GMACs", "macs"),
    ("PSNR vs targets (dB)", "target_psnr_db"), ("fidelity (dB)", "fidelity_psnr_db"), ("SSIM", "ssim"),
    ("p50 (ms)", "latency_p50_ms"), ("p90 (ms)", "latency_p90_ms"), ("img/s", "images_per_second"),
]
#: int8 TorchScript files timed in a plain process: a column after p50 (only when a row has one).
PLAIN_COLUMN = ("plain p50 (ms)", "plain_process_p50_ms")


def columns(result: BenchResult) -> list[tuple[str, str]]:
    """The table's columns: the plain-process p50 beside p50 when some row has it."""
    cols = list(MARKDOWN_COLUMNS)
    if result.plain_process_rows:
        cols.insert(cols.index(("p50 (ms)", "latency_p50_ms")) + 1, PLAIN_COLUMN)
    return cols


def format_value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "macs":
        return f"{v / 1e9:.3f}"
    if key in ("parameters", "nonzero_parameters"):
        return f"{v:,}"
    if key == "ssim":
        return f"{v:.4f}"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.2f}"
    return str(v)


def row_cells(row: BenchRow, cols: list[tuple[str, str]] | None = None) -> list[str]:
    """A row as the table shows it: the reference is marked, its fidelity is 'ref'."""
    d = row.to_dict()
    keys = [k for _, k in (cols or MARKDOWN_COLUMNS)]
    cells = [format_value(k, d[k]) for k in keys]
    if row.is_reference:
        cells[keys.index("name")] += " (ref)"
        cells[keys.index("fidelity_psnr_db")] = cells[keys.index("ssim")] = "ref"
    return cells


def to_markdown(result: BenchResult) -> str:
    cols = columns(result)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result.rows:
        lines.append("| " + " | ".join(row_cells(r, cols)) + " |")
    threads = result.config.effective_threads
    lines.append("")
    lines.append(f"Data: {result.data_source}. Fidelity and SSIM against {Path(result.reference).name}. "
                 f"Latency: batch 1, {threads} thread(s), median of {result.config.runs} runs after "
                 f"{result.config.warmup} warm-up runs, on {os.cpu_count()} CPU cores.")
    lines.extend(result.notes)
    if note := result.plain_process_note():
        lines.append(note)
    return "\n".join(lines) + "\n"
