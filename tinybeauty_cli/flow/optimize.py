"""``tbopt optimize``: search the space tbopt spans for the smallest Core ML file per iOS target and
the fastest int8 CPU file that keep the quality, and write them with the commands that rebuild them.

The search (:mod:`.optimize_search` its order and clock, :mod:`.optimize_make` making and scoring
each step, :mod:`.optimize_cost` the seconds each kind of work takes on this run) goes cheap and
likely gains first: the model as given (plain palettes down to the first miss, then GPTQ palettes),
channel pruning after a short distillation, the distillation continued for the rates that kept
(or to rescue the first rate that missed, with the rates below it), the dear palettes (bits by
layer, fitted), sparse storage last.

Every evaluation is cached by recipe in ``--out/.tbopt-search`` (:mod:`.optimize_cache`): the
pruning, the file and its scores. ``--resume`` reuses them; ``--time-budget`` stops starting new
work and the result lists what was not tried. At the end the int8 files within the budget are
timed again side by side (interleaved, with the original) and the fastest is chosen; the chosen
files are copied into ``--out`` atomically, with ``search.json``, ``search.md`` and ``pareto.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.checkpoint import load_model
from ..core.contexts import torch_threads
from ..core.errors import InputError, OutputError, OutputExistsError, UsageError
from ..core.files import atomic_output, check_folder, folder_lock, normalized, sha256_file
from ..core.images import ImageSet, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.written import WrittenFile
from ..coreml.spec import held
from ..measure.search_report import pareto_figure, pareto_front, search_markdown
from ..runtime.plain_timing import allocator_hint, plain_process_latency
from ..runtime.runners import TorchRunner, open_runner, runner_for
from ..runtime.timing import measure_latencies, steady_allocator
from .optimize_cache import SearchCache
from .optimize_config import CACHE_DIR, REPORT_FILES, TARGET_FILES, OptimizeConfig
from .optimize_data import DataUse, calibration_gap, data_use
from .optimize_result import Candidate, OptimizeResult
from .optimize_result import rounded as _r
from .optimize_make import TWIN, OnRow
from .optimize_make import shown as _shown
from .optimize_replay import Replay, architecture, check_architecture, read_replay, replay_then_search
from .optimize_search import Search


def check_outputs(out: Path, targets: tuple[str, ...], force: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if force or resume:
        return
    names = [TARGET_FILES[t] for t in targets] + list(REPORT_FILES.values()) + [CACHE_DIR]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        exc = OutputExistsError(f"{out}/{existing[0]}" + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""))
        exc.hint = "pass --resume to continue the search there, or --force to start afresh"
        raise exc


def optimize(checkpoint: Path | str, out: Path | str, cfg: OptimizeConfig | None = None, *, force: bool = False,
             resume: bool = False, progress: Progress | None = None, on_row: OnRow | None = None,
             recipe: Path | str | None = None, started: float | None = None) -> OptimizeResult:
    """Search, choose, write (see the module docstring). ``on_row`` sees every model and candidate as it comes.
    ``recipe``: an earlier search's ``search.json`` whose chosen recipes are replayed first
    (:mod:`.optimize_replay`); only the targets where they miss are searched. ``started``: the
    ``time.perf_counter()`` the time budget counts from (default: now; the CLI passes its own start)."""
    cfg = cfg or OptimizeConfig()
    progress = progress or SilentProgress()
    checkpoint, out = Path(checkpoint), normalized(out)
    if force and resume:
        raise UsageError("--resume continues the search in --out; --force starts it afresh: pass one of them")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    check_folder(out, what="search's outputs")
    # one search per folder, from before its first check to its last file (see core.files.folder_lock)
    with folder_lock(out, f"tbopt optimize --out {out}"):
        return _locked_optimize(checkpoint, out, cfg, force, resume, progress, on_row, recipe, started)


def _locked_optimize(checkpoint: Path, out: Path, cfg: OptimizeConfig, force: bool, resume: bool,
                     progress: Progress, on_row: OnRow | None, recipe: Path | str | None = None,
                     started: float | None = None) -> OptimizeResult:
    plan = read_replay(Path(recipe)) if recipe is not None else None  # refused before any work
    check_outputs(out, cfg.targets, force, resume)
    for name in ("data", "calib"):
        folder = getattr(cfg, name)
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"--{name} {folder} is not a folder")
    loaded = load_model(checkpoint, **cfg.model_options())
    if loaded.kind != "float":
        raise UsageError(f"{checkpoint} is a {loaded.kind} model; tbopt optimize starts from a float checkpoint")
    if plan is not None:
        check_architecture(plan, loaded)
    with torch_threads(cfg.threads):
        threads = torch.get_num_threads()
        if force:
            SearchCache(out / CACHE_DIR, {}, progress).clear()
        use = data_use(cfg.data, cfg.calib, loaded.preprocessing.size, cfg.limit, out / CACHE_DIR / "split")
        images = use.images
        context = {**cfg.cache_context(), "checkpoint_sha256": loaded.sha256, "threads": threads,
                   "images": images.source, "images_sha256": _array_digest(images)}
        cache = SearchCache(out / CACHE_DIR, context, progress)
        cfg = dataclasses.replace(cfg, calib=use.calib)  # a split's calibration part, when --calib is --data
        if resume and cache.exists() and not cache.same_context():
            progress.note("the search in --out was made with other settings, images or checkpoint: starting afresh")
        # the original is scored first (a model that computes NaN on the images is refused): nothing is
        # written into --out before that
        search = Search(loaded, images, cfg, cache, progress, on_row, started)
        cache.start()
        if plan is not None:
            replay_then_search(search, plan)
        else:
            search.run()
        gap = calibration_gap(search, use, progress)
        if gap is not None:
            use.notes.append(gap)
        return _finish(search, checkpoint, out, cfg, threads, force or resume, use, plan)


def _array_digest(images: ImageSet) -> str:
    h = hashlib.sha256(images.inputs.tobytes())
    if images.targets is not None:
        h.update(images.targets.tobytes())
    return h.hexdigest()


def _finish(search: Search, checkpoint: Path, out: Path, cfg: OptimizeConfig, threads: int,
            replace: bool, use: DataUse | None = None, plan: Replay | None = None) -> OptimizeResult:
    budget = search.budget
    original_path = Path(search.original.path)
    as_read = WrittenFile.of_bytes(original_path, search.original.content)  # the input's bytes, as read once
    original = {"file": original_path.name, "size_bytes": as_read.size_bytes,
                "zipped_bytes": as_read.zipped_bytes, "target_psnr_db": _r(search.reference.target_psnr_db),
                "quality_db": _r(search.reference.target_psnr_db) if budget.uses_targets else None,
                "latency_ms": None, "engine": "PyTorch eager fp32", "threads": threads}
    t0 = time.perf_counter()
    cpu_times = _time_cpu_side_by_side(search, cfg, original) if "cpu" in cfg.targets else {}
    if "cpu" in cfg.targets:
        search.costs.observe("timing", time.perf_counter() - t0)
    for target in set(c.recipe.target for c in search.candidates):  # the Pareto front, per target
        group = [c for c in search.candidates if c.recipe.target == target and c.quality_db is not None]
        xs = [(c.latency_ms if target == "cpu" and c.latency_ms is not None else c.size_bytes) for c in group]
        for c, on in zip(group, pareto_front([(x, c.quality_db) for x, c in zip(xs, group)])):
            c.pareto = on

    chosen: dict[str, dict[str, Any]] = {}
    for target in cfg.targets:
        kept = [c for c in search.candidates if c.recipe.target == target and c.kept]
        if not kept:
            tried = any(c.recipe.target == target for c in search.candidates)
            chosen[target] = {"file": None, "reason": "no candidate kept the quality within the budget" if tried
                              else "no candidate was tried (time budget)"}
            continue
        if target == "cpu":
            best = min(kept, key=lambda c: (cpu_times.get(c.recipe.key, c.latency_ms or float("inf")), c.size_bytes))
        else:
            best = _verified_smallest(search, kept)
            if best is None:
                chosen[target] = {"file": None, "reason": "no candidate kept the quality when run as tbopt bench runs it"}
                continue
        dest = out / TARGET_FILES[target]
        file = search.cache.file(best.recipe.key)  # the bytes scored: as written, or as read and checked
        with atomic_output(dest, force=replace, directory=file.is_folder) as tmp:
            file.write_to(tmp)
            if sha256_file(tmp) != file.sha256:  # what reached the disk, read once before it is renamed into place
                raise OutputError(f"the copy of {file.path} for {dest} differs from it", hint="nothing was replaced")
        written = {"size_bytes": file.size_bytes, "zipped_bytes": file.zipped_bytes, "sha256": file.sha256}
        chosen[target] = {**best.to_dict(), **written, "file": str(dest),
                          "latency_ms": cpu_times.get(best.recipe.key, best.latency_ms),
                          "commands": best.recipe.commands(_shown(checkpoint), _shown(dest), cfg, threads,
                                                       backend=best.backend)}
        if target == "cpu":
            chosen[target].update(plain_latency(dest, chosen[target]["latency_ms"], cfg, threads))

    command = _command_line(checkpoint, out, dataclasses.replace(cfg, calib=cfg.data) if use and use.split else cfg)
    if plan is not None:
        command += f" --recipe {_shown(plan.source)}"
        plan.settle(chosen)
    result = OptimizeResult(str(checkpoint), str(out), command, cfg, budget, search.images.source, original,
                            search.candidates, search.models, search.skipped, search.not_tried, chosen,
                            time.perf_counter() - search.t_start, threads, stopped=search.stopped,
                            costs=search.costs.to_dict(), images_use=use.to_dict() if use else {},
                            architecture=architecture(search.original), replay=plan.to_dict() if plan else {})
    result.notes.extend(use.notes if use else [])
    if search.not_tried:
        result.notes.append(f"the time budget stopped the search: {len(search.not_tried)} step(s) not tried "
                            f"(listed in search.json); --resume with a larger --time-budget continues it")
    _write_reports(out, result.to_dict())
    return result


def _write_reports(out: Path, data: dict[str, Any]) -> None:
    with atomic_output(out / REPORT_FILES["json"], force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    with atomic_output(out / REPORT_FILES["markdown"], force=True) as tmp:
        tmp.write_text(search_markdown(data))
    with atomic_output(out / REPORT_FILES["figure"], force=True) as tmp:
        pareto_figure(data, tmp)


def plain_latency(path: Path, kept_ms: float | None, cfg: OptimizeConfig, threads: int) -> dict[str, Any]:
    """The chosen int8 file's latency as a plain Python process gets it, beside the figure that chose it
    (freed memory kept), and the one line that gives a user's process the faster one."""
    plain = plain_process_latency(path, runs=cfg.runs, warmup=cfg.warmup, threads=threads)
    plain_ms = plain["p50_ms"] if plain else None
    return {"latency_plain_process_ms": plain_ms, "latency_chosen_by": f"latency with {steady_allocator()}",
            "latency_note": f"chosen by its latency with freed memory kept ({kept_ms} ms); a plain Python process "
                            f"that leaves glibc's allocator as it starts: {plain_ms} ms; for the faster figure: "
                            f"{allocator_hint()}"}


def _verified_smallest(search: Search, kept: list[Candidate]) -> Candidate | None:
    """The smallest Core ML candidate that still keeps the quality when its file is run as
    ``tbopt bench`` runs it (Core ML on macOS, the reference executor elsewhere); its figures
    become those. One that misses is marked so and the next smallest is tried."""
    for cand in sorted(kept, key=lambda c: (c.size_bytes, -(c.quality_db or 0.0))):
        if cand.scored_with != TWIN:
            return cand
        with held(search.cache.file(cand.recipe.key)) as copy:  # the bytes the search copies into --out
            ev = search.score(open_runner(copy), f"scoring {cand.recipe.key} as a file")
        cand.target_psnr_db, cand.fidelity_psnr_db = _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db)
        cand.worst_fidelity_db = _r(ev.worst_fidelity_db)
        cand.quality_db = _r(search.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db))
        cand.kept = search.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db)
        cand.scored_with = "the file, as tbopt bench runs it"
        search.cache.store(cand.recipe.key, cand.to_dict(), search.cache.file(cand.recipe.key))
        if cand.kept:
            return cand
        cand.notes.append("kept the quality in PyTorch with the file's weights, but not when the file itself ran")
    return None


def _time_cpu_side_by_side(search: Search, cfg: OptimizeConfig, original: dict[str, Any]) -> dict[str, float]:
    """The int8 files within the budget and the original, timed with their runs interleaved (same load)."""
    x1 = uint8_to_model(search.images.inputs[:1])
    fns: dict[str, Callable[[], object]] = {}
    orig_runner = TorchRunner(search.original.module.eval(), search.original.preprocessing)
    fns["original"] = lambda: orig_runner.predict(x1)
    for c in search.candidates:
        if c.recipe.is_cpu and c.kept:
            runner = runner_for(search.maker.int8_model(c.recipe.key))
            fns[c.recipe.key] = (lambda r: (lambda: r.predict(x1)))(runner)
    with search.progress.task("timing the int8 files side by side", total=None):
        lat = measure_latencies(fns, runs=cfg.runs, warmup=cfg.warmup, threads=cfg.threads)
    original["latency_ms"] = _r(lat["original"].p50_ms)
    times = {k: round(v.p50_ms, 3) for k, v in lat.items() if k != "original"}
    for c in search.candidates:
        if c.recipe.key in times:
            c.latency_ms = times[c.recipe.key]
    return times


def _command_line(checkpoint: Path, out: Path, cfg: OptimizeConfig) -> str:
    parts = [f"tbopt optimize {_shown(checkpoint)} --out {_shown(out)} --max-drop {cfg.max_drop_db:g}"]
    parts += [f"--for {t}" for t in cfg.targets]
    for opt, name in (("--data", "data"), ("--calib", "calib"), ("--limit", "limit"), ("--threads", "threads")):
        if getattr(cfg, name) is not None:
            parts.append(f"{opt} {getattr(cfg, name)}")
    if cfg.time_budget_min != OptimizeConfig.time_budget_min:
        parts.append(f"--time-budget {cfg.time_budget_min or 0:g}")
    if cfg.min_fidelity_db != OptimizeConfig.min_fidelity_db:
        parts.append(f"--min-fidelity {cfg.min_fidelity_db:g}")
    return " ".join(parts)
