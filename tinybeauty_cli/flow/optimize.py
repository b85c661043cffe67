"""``tbopt optimize``: search the space tbopt spans for the smallest Core ML file per iOS target and
the fastest int8 CPU file that keep the quality, and write them with the commands that rebuild them.

The search, cheap before dear:

1. the original model's plain weight storage per Core ML target: fp16, int8, palettes from 8
   bits down (a branch stops at the first palette that misses the budget); then int8
   TorchScript for ``cpu`` (timed; the engine ranked by ``tbopt quantize``);
2. channel pruning, rates ascending, per distillation length (a longer one only for the rates a
   shorter one kept): the pruned float model is scored first and a rate that misses the budget
   stops its branch (higher rates are not pruned); a pruned model that keeps the quality gets the
   same storage search as the original;
3. the dear storage, for the palettes that missed: bits chosen by layer in the same bytes, fitted
   palettes, both; smallest files first, down a palette size while one keeps the quality, and
   nothing whose weights alone outweigh the smallest file kept (:meth:`_Search.cannot_beat`);
4. weights zeroed and stored sparse in fp16 (ML Programs), last: on TinyBeauty it has not kept
   the quality where a palette of the same bytes did.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.artifact import save_artifact
from ..core.checkpoint import LoadedModel, load_model
from ..core.contexts import torch_threads
from ..core.errors import InputError, OutputExistsError, TbOptError, UnsupportedError, UsageError
from ..core.files import atomic_output, size_on_disk, zipped_size
from ..core.images import ImageSet, load_images, uint8_to_model
from ..core.progress import Progress, SilentProgress
from ..core.quality import made_up
from ..coreml.weights import carry_file_weights, stored_weights
from ..export.config import ExportConfig, storage_bits
from ..export.prepare import coreml_ready_module
from ..measure.evaluate import Evaluation, Scores, evaluate
from ..measure.search_report import pareto_figure, pareto_front, search_markdown
from ..runtime.runners import TorchRunner, open_runner, runner_for
from ..runtime.timing import measure_latencies
from .export import export_loaded
from .optimize_cache import SearchCache
from .optimize_config import CACHE_DIR, REPORT_FILES, TARGET_FILES, Budget, OptimizeConfig, Recipe
from .optimize_result import Candidate, ModelEntry, OptimizeResult
from .optimize_result import rounded as _r
from .prune import prune_loaded
from .quantize import quantize_loaded


def with_fitted_palettes(config: ExportConfig, steps: int, calib: Path | None = None) -> ExportConfig:
    """The export configuration that fits the palettes for ``steps`` steps before palettizing
    (``tbopt export --fit-palettes N [--calib DIR]``), on the search's unlabeled images."""
    return dataclasses.replace(config, fit_palettes=steps, fit_data=str(calib) if calib else None)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


OnRow = Callable[[Any], None]
#: The most PSNR fitted palettes recovered over plain ones in our measurements (1.6 dB: the demo,
#: pal4, 300 steps); a palette further below the budget is not fitted.
FIT_REACH_DB = 2.0
#: Layers whose weights a Core ML export compresses.
_STORED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)

#: How the search scores a Core ML file: the file's own weights in PyTorch (3-4x faster than the
#: reference executor off macOS); the chosen files are scored again as tbopt bench runs them.
TWIN = "PyTorch with the file's decompressed weights"


@dataclass
class _ImageOutTwin(TorchRunner):
    """The twin of a file with an image output: the made-up image stored in 8 bits, as Core ML does."""

    def residual(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.preprocessing.value_range
        y = made_up(x, super().residual(x))
        y8 = np.clip(np.rint((y - lo) * (255.0 / (hi - lo))), 0, 255)
        return y8 * ((hi - lo) / 255.0) + lo - x


def file_twin(model: LoadedModel, path: Path, fmt: str) -> TorchRunner:
    """The Core ML file at ``path`` (exported from ``model`` with image I/O) as a PyTorch runner carrying
    its stored weights."""
    size = model.preprocessing.size
    twin = coreml_ready_module(model.module, size, fmt)
    carry_file_weights(twin, stored_weights(path), torch.zeros(1, 3, size, size))
    return _ImageOutTwin(twin.eval(), model.preprocessing, engine=TWIN)


class _Search:
    """The search's state: the original and its scores, the cache, the clock, what was found."""

    def __init__(self, loaded: LoadedModel, images: ImageSet, cfg: OptimizeConfig, cache: SearchCache,
                 progress: Progress, on_row: OnRow | None):
        self.original, self.images, self.cfg, self.cache = loaded, images, cfg, cache
        self.progress, self.on_row = progress, on_row or (lambda row: None)
        self.t_start = time.perf_counter()
        self.candidates: list[Candidate] = []
        self.models: list[ModelEntry] = []
        self.skipped: list[dict[str, str]] = []
        self.not_tried: list[dict[str, str]] = []
        self.to_rescue: list[tuple[Recipe, list[str]]] = []  # (model and target, palettes from the first miss)
        self.pace: list[float] = []  # seconds per distillation step of the channel-pruned models made
        self.to_sparsify: list[Recipe] = []  # models and targets whose weights are then zeroed and stored sparse
        self.fits: dict[tuple, Any] = {}  # palette fits, shared between targets (export_loaded)
        prep = loaded.preprocessing
        self.reference: Evaluation = evaluate(TorchRunner(loaded.module.eval(), prep), images, progress=progress,
                                              description="scoring the original")
        self.budget = Budget(_r(self.reference.target_psnr_db), cfg.max_drop_db, cfg.min_fidelity_db)
        self._models: dict[str, LoadedModel | None] = {"original": loaded}

    # -- the clock and the bookkeeping -------------------------------------------------------------------
    def time_left(self, expected_s: float = 0.0) -> bool:
        """True when the time budget leaves room to start a step expected to take ``expected_s``."""
        budget = self.cfg.time_budget_s
        return budget is None or time.perf_counter() - self.t_start + expected_s < budget

    def expected_seconds(self, recipe: Recipe) -> float:
        """What making ``recipe``'s channel-pruned model should take: its distillation steps at the
        pace of the pruned models made so far in this search (0 before the first)."""
        if recipe.sparsity or not recipe.rate or not self.pace:
            return 0.0
        return recipe.steps * sum(self.pace) / len(self.pace)

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})

    def later(self, key: str) -> None:
        self.not_tried.append({"key": key, "reason": "time budget reached before it was started"})

    def score(self, runner: Any, description: str) -> Evaluation:
        return evaluate(runner, self.images, reference=self.reference.outputs, progress=self.progress,
                        description=description)

    # -- float models ---------------------------------------------------------------------------------------
    def model(self, recipe: Recipe) -> LoadedModel | None:
        """The float model ``recipe`` stores, made (or read from the cache) on first use; None when it
        misses the budget (its branch stops) or there was no time to make it."""
        key = recipe.model_key
        if key in self._models:
            return self._models[key]
        # weights are zeroed in the (channel-pruned) model; channels are pruned from the original
        source = self.model(dataclasses.replace(recipe, sparsity=0.0)) if recipe.sparsity else self.original
        if source is None:
            return None
        path = self.cache.model_path(key)
        record = self.cache.load(key)
        if record is not None:
            e = record["entry"]
            psnr, fid = e["target_psnr_db"], e["fidelity_psnr_db"]
            entry = ModelEntry(**{**e, "quality_db": self.budget.quality(psnr, fid),
                                  "kept": self.budget.keeps(psnr, fid), "cached": True})
        elif not self.time_left(self.expected_seconds(recipe)):
            self.later(key)
            self._models[key] = None
            return None
        else:
            t0 = time.perf_counter()
            cfg = recipe.sparse_config(self.cfg.seed) if recipe.sparsity else recipe.prune_config(self.cfg.seed)
            original = self.original.module

            def scorer(module: nn.Module, reference: np.ndarray | None, description: str) -> Evaluation:
                if module is original:  # scored once, at the start
                    return self.reference
                return evaluate(TorchRunner(module.eval(), source.preprocessing), self.images, reference=reference,
                                progress=self.progress, description=description)

            artifact, _module, _report = prune_loaded(source, cfg, data=self.cfg.calib, eval_images=self.images,
                                                      progress=self.progress, scorer=scorer)
            save_artifact(artifact, path, force=True)
            loaded = load_model(path)
            ev = self.score(runner_for(loaded), f"scoring {key}")
            q = self.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db)
            entry = ModelEntry(key, self.cache.relative(path), _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db), _r(q),
                               self.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db),
                               round(time.perf_counter() - t0, 1))
            if recipe.rate and recipe.steps and not recipe.sparsity:
                self.pace.append(entry.seconds / recipe.steps)  # seconds per distillation step, all included
            self.cache.store(key, {"file": entry.file, "entry": entry.to_dict()})
        self.models.append(entry)
        self.on_row(entry)
        self._models[key] = load_model(path) if entry.kept else None
        return self._models[key]

    def missed(self, model_key: str) -> bool:
        """True when the float model ``model_key`` was made and misses the budget."""
        return any(m.key == model_key and not m.kept for m in self.models)

    def weight_bytes(self, recipe: Recipe) -> int | None:
        """A lower bound of ``recipe``'s file size: its conv weights alone at its bits per weight (None
        when its float model was not made)."""
        parent = self.model(dataclasses.replace(recipe, sparsity=0.0))
        if parent is None:
            return None
        n = sum(m.weight.numel() for m in parent.module.modules() if isinstance(m, _STORED))
        bits = storage_bits(recipe.export_config().weight_mode)
        return int((1.0 - recipe.sparsity) * n * bits / 8 + (n / 8 if recipe.sparsity else 0))

    def cannot_beat(self, recipe: Recipe) -> bool:
        """True (and noted) when ``recipe``'s conv weights alone, at its bits per weight, take at least
        as many bytes as the smallest file within the budget found so far for its target."""
        kept = [c for c in self.candidates if c.recipe.target == recipe.target and c.kept]
        if not kept:
            return False
        bound = self.weight_bytes(recipe)
        if bound is None:
            return False
        best = min(kept, key=lambda c: c.size_bytes)
        if bound < best.size_bytes:
            return False
        self.skip(recipe.key, f"its weights alone take at least {bound:,} bytes; {best.recipe.key} is "
                              f"{best.size_bytes:,} bytes")
        return True

    # -- candidates -----------------------------------------------------------------------------------------
    def candidate(self, recipe: Recipe) -> Candidate | None:
        """Evaluate ``recipe`` (or read it from the cache); None when it could not be tried."""
        record = self.cache.load(recipe.key)
        if record is not None:
            cand = Candidate.from_record(record, self.budget)
        else:
            if not recipe.is_cpu and self.cannot_beat(recipe):
                return None
            model = self.model(recipe)
            if model is None:
                return None
            if not self.time_left():
                self.later(recipe.key)
                return None
            t0 = time.perf_counter()
            folder = self.cache.file_dir(recipe.key)
            shutil.rmtree(folder, ignore_errors=True)  # a half-made earlier attempt
            path = folder / TARGET_FILES[recipe.target]
            try:
                cand = self._cpu(recipe, model, path) if recipe.is_cpu else self._coreml(recipe, model, path)
            except UnsupportedError as exc:
                self.skip(recipe.key, str(exc))
                return None
            cand.seconds = round(time.perf_counter() - t0, 1)
            self.cache.store(recipe.key, cand.to_dict())
        self.candidates.append(cand)
        self.on_row(cand)
        return cand

    def _measured(self, recipe: Recipe, path: Path, ev: Evaluation, **extra: Any) -> Candidate:
        return Candidate(recipe, self.cache.relative(path), size_on_disk(path), zipped_size(path),
                         _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db), _r(ev.worst_fidelity_db),
                         _r(self.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db)),
                         self.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db), 0.0, **extra)

    def _coreml(self, recipe: Recipe, model: LoadedModel, path: Path) -> Candidate:
        config = recipe.export_config()
        if recipe.fit_steps:
            config = with_fitted_palettes(config, recipe.fit_steps, self.cfg.calib)
        if recipe.bits_by_layer and self.cfg.calib:
            config = dataclasses.replace(config, calib=str(self.cfg.calib))  # bits are chosen on them
        result = export_loaded(model, path, config, force=True, progress=self.progress, fits=self.fits)
        ev = self.score(file_twin(model, path, config.format), f"scoring {recipe.key}")
        return self._measured(recipe, path, ev, notes=list(result.notes), scored_with=TWIN)

    def _cpu(self, recipe: Recipe, model: LoadedModel, path: Path) -> Candidate:
        scores = Scores(self.images, self.progress)
        command = " && ".join(recipe.commands(_shown(Path(self.original.path)), path.name, self.cfg,
                                              torch.get_num_threads()))
        qcfg = self.cfg.quantize_config()
        if qcfg.backend == "auto":
            # The engine is ranked by timing; the file is then made with it pinned, as the printed
            # command makes it (calibration batches differ between the two ways).
            quick = dataclasses.replace(qcfg, eval_limit=1, runs=1, warmup=0)  # the ranking is all it is for
            ranked = quantize_loaded(model, path.with_name("ranking.pt"), quick, force=True, progress=self.progress,
                                     command=command, source_bytes=model.content or None)
            path.with_name("ranking.pt").unlink()
            qcfg = dataclasses.replace(qcfg, backend=ranked.backend)
        result = quantize_loaded(model, path, qcfg, force=True, progress=self.progress,
                                 command=command, source_bytes=model.content or None, scores=scores)
        written = result.written
        assert written is not None
        ev = scores.score(written.module, runner_for(written), "scoring int8", reference=self.reference.outputs)
        return self._measured(recipe, path, ev, latency_ms=_r(result.latency["int8"]["p50_ms"]),
                              engine=result.engine, threads=result.latency["threads"], backend=result.backend,
                              notes=list(result.notes))

    # -- the order of the search ------------------------------------------------------------------------------
    def storage_branch(self, model_recipe: Recipe, target: str) -> None:
        """Every plain storage of one float model for one target, cheap first; a branch stops at its
        first miss, which is remembered for :meth:`rescue` (bits by layer, fitted palettes)."""
        base = dataclasses.replace(model_recipe, target=target)
        if target == "cpu":
            self.candidate(dataclasses.replace(base, weights="int8"))
            return
        fp16 = self.candidate(dataclasses.replace(base, weights="fp16"))
        if fp16 is not None and not fp16.kept:
            self.skip(f"{target}/{base.model_key}/*", "fp16 storage already misses the budget")
            return
        self.candidate(dataclasses.replace(base, weights="int8"))
        modes = self.cfg.storage_modes(target)
        for i, mode in enumerate(modes):
            cand = self.candidate(dataclasses.replace(base, weights=mode))
            if cand is not None and not cand.kept:
                for rest in modes[i + 1:]:
                    self.skip(dataclasses.replace(base, weights=rest).key, f"{mode} missed the budget")
                self.to_rescue.append((base, modes[i:]))
                break
        self.to_sparsify.append(base)  # after the dear palettes: sparse fp16 has not won on TinyBeauty

    def bits_available(self, recipe: Recipe) -> bool:
        """True when ``tbopt export`` can choose palette bits by layer for ``recipe``'s file."""
        try:
            dataclasses.replace(recipe, bits_by_layer=True).export_config()
        except TbOptError:
            return False
        return True

    def rescue(self) -> None:
        """The dear part: the palettes that missed the budget stored with bits chosen by layer (same
        bytes), then fitted (``--fit-palettes``), model by model and target by target, the smallest
        files first, going down a palette size while one of them keeps the quality. A candidate whose
        weights alone cannot beat the smallest file kept so far is not made (:meth:`cannot_beat`)."""
        def promise(item: tuple[Recipe, list[str]]) -> tuple[int, float]:
            # the smallest files first; of the same bytes, the one whose plain palette came closest
            base, modes = item
            recipe = dataclasses.replace(base, weights=modes[0])
            plain = [c.quality_db for c in self.candidates if c.recipe == recipe and c.quality_db is not None]
            return self.weight_bytes(recipe) or 0, -(plain[0] if plain else float("-inf"))

        order = sorted(self.to_rescue, key=promise)
        for base, modes in order:
            for mode in modes:
                recipe = dataclasses.replace(base, weights=mode)
                variants = []
                if self.cfg.bits_by_layer and self.bits_available(recipe):
                    variants.append(dataclasses.replace(recipe, bits_by_layer=True))
                if self.cfg.fit_steps:
                    variants.append(dataclasses.replace(recipe, fit_steps=self.cfg.fit_steps))
                    if variants[0].bits_by_layer:
                        variants.append(dataclasses.replace(recipe, bits_by_layer=True, fit_steps=self.cfg.fit_steps))
                kept = False
                for variant in variants:
                    if variant.fit_steps and self.too_far_to_fit(recipe):
                        self.skip(variant.key, f"{recipe.storage} is more than {FIT_REACH_DB:g} dB below the "
                                               f"budget, more than fitting has recovered")
                        continue
                    cand = self.candidate(variant)
                    if cand is not None and cand.kept:
                        kept = True
                        break
                if not kept:
                    break

    def too_far_to_fit(self, recipe: Recipe) -> bool:
        """True when ``recipe``'s palettes (with bits by layer, when tried) fall further below the
        budget than fitting is known to recover."""
        closest = [c.quality_db for c in self.candidates if c.quality_db is not None and not c.recipe.fit_steps
                   and dataclasses.replace(c.recipe, bits_by_layer=False) == recipe]
        return bool(closest) and max(closest) < self.budget.line_db - FIT_REACH_DB

    def sparse_branch(self, base: Recipe) -> None:
        """Weights zeroed (global magnitude) and stored sparse in fp16: ML Programs only."""
        if base.target == "ios13":
            return
        for i, s in enumerate(self.cfg.sparsities):
            recipe = dataclasses.replace(base, sparsity=s, weights="fp16")
            cand = self.candidate(recipe)
            if (cand is not None and not cand.kept) or self.missed(recipe.model_key):
                for rest in self.cfg.sparsities[i + 1:]:
                    self.skip(dataclasses.replace(base, sparsity=rest, weights="fp16").key,
                              f"sparsity {s:g} missed the budget")
                break

    def run(self) -> None:
        targets = [t for t in self.cfg.targets if t != "cpu"] + [t for t in self.cfg.targets if t == "cpu"]
        original = Recipe(target=targets[0])
        for target in targets:
            self.storage_branch(original, target)
        rates = self.cfg.rates
        for steps in self.cfg.resolved_steps():
            kept_rates = []
            for i, rate in enumerate(rates):
                recipe = Recipe(target=targets[0], rate=rate, steps=steps)
                if self.model(recipe) is None:
                    if self.missed(recipe.model_key):
                        for rest in rates[i + 1:]:
                            self.skip(f"*/{dataclasses.replace(recipe, rate=rest).model_key}/*",
                                      f"channel pruning at {rate:g} already misses the budget")
                        break
                    continue
                kept_rates.append(rate)
                for target in targets:
                    self.storage_branch(recipe, target)
            rates = tuple(kept_rates)  # a longer distillation only where the shorter one kept the quality
        self.rescue()
        for base in self.to_sparsify:
            self.sparse_branch(base)


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
             resume: bool = False, progress: Progress | None = None, on_row: OnRow | None = None) -> OptimizeResult:
    """Search, choose, write (see the module docstring). ``on_row`` sees every model and candidate as it comes."""
    cfg = cfg or OptimizeConfig()
    progress = progress or SilentProgress()
    checkpoint, out = Path(checkpoint), Path(out)
    if force and resume:
        raise UsageError("--resume continues the search in --out; --force starts it afresh: pass one of them")
    check_outputs(out, cfg.targets, force, resume)
    for name in ("data", "calib"):
        folder = getattr(cfg, name)
        if folder is not None and not Path(folder).is_dir():
            raise InputError(f"--{name} {folder} is not a folder")
    loaded = load_model(checkpoint)
    if loaded.kind != "float":
        raise UsageError(f"{checkpoint} is a {loaded.kind} model; tbopt optimize starts from a float checkpoint")
    with torch_threads(cfg.threads):
        threads = torch.get_num_threads()
        images = load_images(cfg.data, loaded.preprocessing.size, cfg.limit)
        context = {**cfg.cache_context(), "checkpoint_sha256": loaded.sha256, "threads": threads,
                   "images": images.source, "images_sha256": _array_digest(images)}
        cache = SearchCache(out / CACHE_DIR, context)
        if force:
            cache.clear()
        if resume and cache.exists() and not cache.same_context():
            progress.note("the search in --out was made with other settings, images or checkpoint: starting afresh")
        cache.start()
        search = _Search(loaded, images, cfg, cache, progress, on_row)
        search.run()
        return _finish(search, checkpoint, out, cfg, threads, force or resume)


def _array_digest(images: ImageSet) -> str:
    h = hashlib.sha256(images.inputs.tobytes())
    if images.targets is not None:
        h.update(images.targets.tobytes())
    return h.hexdigest()


def _finish(search: _Search, checkpoint: Path, out: Path, cfg: OptimizeConfig, threads: int,
            replace: bool) -> OptimizeResult:
    budget = search.budget
    original_path = Path(search.original.path)
    original = {"file": original_path.name, "size_bytes": size_on_disk(original_path),
                "zipped_bytes": zipped_size(original_path), "target_psnr_db": _r(search.reference.target_psnr_db),
                "quality_db": _r(search.reference.target_psnr_db) if budget.uses_targets else None,
                "latency_ms": None, "engine": "PyTorch eager fp32", "threads": threads}
    cpu_times = _time_cpu_side_by_side(search, cfg, original) if "cpu" in cfg.targets else {}
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
        src = search.cache.absolute(best.file)
        with atomic_output(dest, force=replace, directory=src.is_dir()) as tmp:
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
        chosen[target] = {**best.to_dict(), "file": str(dest),
                          "latency_ms": cpu_times.get(best.recipe.key, best.latency_ms),
                          "commands": best.recipe.commands(_shown(checkpoint), _shown(dest), cfg, threads,
                                                       backend=best.backend)}

    command = _command_line(checkpoint, out, cfg)
    result = OptimizeResult(str(checkpoint), str(out), command, cfg, budget, search.images.source, original,
                            search.candidates, search.models, search.skipped, search.not_tried, chosen,
                            time.perf_counter() - search.t_start, threads)
    if search.not_tried:
        result.notes.append(f"the time budget stopped the search: {len(search.not_tried)} step(s) not tried "
                            f"(listed in search.json); --resume with a larger --time-budget continues it")
    data = result.to_dict()
    with atomic_output(out / REPORT_FILES["json"], force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    with atomic_output(out / REPORT_FILES["markdown"], force=True) as tmp:
        tmp.write_text(search_markdown(data))
    with atomic_output(out / REPORT_FILES["figure"], force=True) as tmp:
        pareto_figure(data, tmp)
    return result


def _verified_smallest(search: _Search, kept: list[Candidate]) -> Candidate | None:
    """The smallest Core ML candidate that still keeps the quality when its file is run as
    ``tbopt bench`` runs it (Core ML on macOS, the reference executor elsewhere); its figures
    become those. One that misses is marked so and the next smallest is tried."""
    for cand in sorted(kept, key=lambda c: (c.size_bytes, -(c.quality_db or 0.0))):
        if cand.scored_with != TWIN:
            return cand
        ev = search.score(open_runner(search.cache.absolute(cand.file)), f"scoring {cand.recipe.key} as a file")
        cand.target_psnr_db, cand.fidelity_psnr_db = _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db)
        cand.worst_fidelity_db = _r(ev.worst_fidelity_db)
        cand.quality_db = _r(search.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db))
        cand.kept = search.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db)
        cand.scored_with = "the file, as tbopt bench runs it"
        search.cache.store(cand.recipe.key, cand.to_dict())
        if cand.kept:
            return cand
        cand.notes.append("kept the quality in PyTorch with the file's weights, but not when the file itself ran")
    return None


def _time_cpu_side_by_side(search: _Search, cfg: OptimizeConfig, original: dict[str, Any]) -> dict[str, float]:
    """The int8 files within the budget and the original, timed with their runs interleaved (same load)."""
    x1 = uint8_to_model(search.images.inputs[:1])
    fns: dict[str, Callable[[], object]] = {}
    orig_runner = TorchRunner(search.original.module.eval(), search.original.preprocessing)
    fns["original"] = lambda: orig_runner.predict(x1)
    for c in search.candidates:
        if c.recipe.is_cpu and c.kept:
            runner = runner_for(load_model(search.cache.absolute(c.file)))
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
