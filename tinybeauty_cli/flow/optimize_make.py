"""How ``tbopt optimize`` makes, scores and times each step: the float models (channel-pruned,
distilled, a distillation continued, weights zeroed) and the candidate files (Core ML storage, GPTQ
and fitted palettes, int8 TorchScript), each read from the search cache when it was made before.
What to try next, and whether it fits the time budget, is :mod:`.optimize_search`'s; every step
made here puts its seconds into the cost model that decides it (:mod:`.optimize_cost`).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.artifact import write_artifact
from ..core.checkpoint import LoadedModel, model_from_bytes
from ..core.images import ImageSet
from ..core.progress import Progress
from ..core.quality import made_up
from ..core.written import WrittenFile
from ..coreml.weights import carry_file_weights
from ..export.config import ExportConfig, storage_bits
from ..export.prepare import coreml_ready_module
from ..measure.evaluate import Evaluation, Scores, evaluate
from ..prune.layers import full_resolution_convs
from ..runtime.runners import TorchRunner, open_runner, runner_for
from .export import export_loaded
from .optimize_cache import SearchCache
from .optimize_config import TARGET_FILES, Budget, OptimizeConfig, Recipe
from .optimize_cost import CostModel
from .optimize_result import Candidate, ModelEntry
from .optimize_result import rounded as _r
from .prune import prune_loaded
from .quantize import quantize_loaded

OnRow = Callable[[Any], None]
#: Layers whose weights a Core ML export compresses.
_STORED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
#: How the search scores a Core ML file: the file's own weights in PyTorch (3-4x faster than the
#: reference executor off macOS); the chosen files are scored again as tbopt bench runs them.
TWIN = "PyTorch with the file's decompressed weights"


def with_fitted_palettes(config: ExportConfig, steps: int, calib: Path | None = None) -> ExportConfig:
    """The export configuration that fits the palettes for ``steps`` steps before palettizing
    (``tbopt export --fit-palettes N [--calib DIR]``), on the search's unlabeled images."""
    return dataclasses.replace(config, fit_palettes=steps, fit_data=str(calib) if calib else None)


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class _ImageOutTwin(TorchRunner):
    """The twin of a file with an image output: the made-up image stored in 8 bits, as Core ML does."""

    def residual(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.preprocessing.value_range
        y = made_up(x, super().residual(x))
        y8 = np.clip(np.rint((y - lo) * (255.0 / (hi - lo))), 0, 255)
        return y8 * ((hi - lo) / 255.0) + lo - x


def file_twin(model: LoadedModel, weights: list, fmt: str) -> TorchRunner | None:
    """A Core ML file exported from ``model`` with image I/O, as a PyTorch runner carrying its stored
    ``weights`` (``coreml.weights.stored_weights``, as the export read them); None when the converter
    folded ops into those weights (a scale after a conv): no PyTorch model with them computes what the
    file does, and the file itself must be run."""
    size = model.preprocessing.size
    twin = coreml_ready_module(model.module, size, fmt)
    match = carry_file_weights(twin, weights, torch.zeros(1, 3, size, size))
    if match.rewritten:
        return None
    return _ImageOutTwin(twin.eval(), model.preprocessing, engine=TWIN)


class Maker:
    """Makes (or reads from the cache) float models and candidates, scores them, and times the work."""

    def __init__(self, loaded: LoadedModel, images: ImageSet, cfg: OptimizeConfig, cache: SearchCache,
                 progress: Progress, on_row: OnRow | None, costs: CostModel):
        self.original, self.images, self.cfg, self.cache = loaded, images, cfg, cache
        self.progress, self.on_row, self.costs = progress, on_row or (lambda row: None), costs
        self.candidates: list[Candidate] = []
        self.models: list[ModelEntry] = []
        self.fits: dict[tuple, Any] = {}  # palette fits, shared between targets (export_loaded)
        self._models: dict[str, tuple[LoadedModel, ModelEntry]] = {}
        self._int8: dict[str, LoadedModel] = {}  # the int8 models made in this run, by recipe key
        # The PyTorch models (float and int8) each run once on the images: an int8 file's float model is
        # scored when it is made and again by quantize; the original's outputs are kept throughout.
        self.scores = Scores(images, progress, keep=2)
        prep = loaded.preprocessing
        self.reference: Evaluation = self.score(TorchRunner(loaded.module.eval(), prep, name=str(loaded.path)), "scoring the original",
                                                reference=False, remember=True)
        self.budget = Budget(_r(self.reference.target_psnr_db), cfg.max_drop_db, cfg.min_fidelity_db)
        size = prep.size
        self.full_res = tuple(full_resolution_convs(copy.deepcopy(loaded.module), torch.zeros(1, 3, size, size)))

    def score(self, runner: Any, description: str, reference: bool = True, kind: str = "score",
              remember: bool = False) -> Evaluation:
        """``runner`` scored on the search's images; with ``remember``, its outputs are kept for the next
        score of the same model (:class:`Scores`)."""
        t0 = time.perf_counter()
        ref = self.reference.outputs if reference else None
        if remember:
            ev = self.scores.score(runner, runner, description, reference=ref)
        else:
            ev = evaluate(runner, self.images, reference=ref, progress=self.progress, description=description)
        self.costs.observe(kind, time.perf_counter() - t0)
        return ev

    # -- float models ---------------------------------------------------------------------------------------
    def known_model(self, key: str) -> tuple[LoadedModel, ModelEntry] | None:
        """The float model ``key`` and its entry, when made in this search or found in the cache."""
        if key in self._models:
            return self._models[key]
        entry = self.cache.load(key, ModelEntry.from_record)
        if entry is None:
            return None
        psnr, fid = entry.target_psnr_db, entry.fidelity_psnr_db
        entry = dataclasses.replace(entry, quality_db=self.budget.quality(psnr, fid), kept=self.budget.keeps(psnr, fid),
                                    cached=True)
        file = self.cache.file(key)  # read once, when the cache checked it
        return self._remember(key, model_from_bytes(file.path, file.content), entry)

    def _remember(self, key: str, model: LoadedModel, entry: ModelEntry) -> tuple[LoadedModel, ModelEntry]:
        self._models[key] = (model, entry)
        self.models.append(entry)
        self.on_row(entry)
        return self._models[key]

    def model_work(self, recipe: Recipe) -> dict[str, float]:
        """The units of work making ``recipe``'s float model takes (for the cost model)."""
        if recipe.sparsity:
            return {"score": 1}
        if not recipe.rate:
            return {}
        work = {"distill_step": recipe.steps - recipe.from_steps, "score": 1}
        if not recipe.from_steps:
            work["prune"] = 1
        return work

    def make_model(self, recipe: Recipe, source: LoadedModel, shorter: LoadedModel | None = None
                   ) -> tuple[LoadedModel, ModelEntry]:
        """Prune ``source`` as ``recipe`` says (weights zeroed when ``recipe.sparsity``; a distillation
        continued from ``shorter`` when ``recipe.from_steps``), score it once and cache it."""
        key = recipe.model_key
        t0 = time.perf_counter()
        cfg = recipe.sparse_config(self.cfg.seed) if recipe.sparsity else recipe.prune_config(self.cfg.seed)
        final: list[Evaluation] = []

        def scorer(module: nn.Module, reference: np.ndarray | None, description: str, label: str) -> Evaluation:
            if module is self.original.module:  # scored once, at the start
                return self.reference
            final.append(self.score(TorchRunner(module.eval(), source.preprocessing, name=label), f"scoring {key}",
                                    remember=True))
            return final[-1]

        artifact, _module, report = prune_loaded(source, cfg, data=self.cfg.calib, eval_images=self.images,
                                                 progress=self.progress, scorer=scorer, continue_from=shorter,
                                                 score_before_finetune=False)
        path = self.cache.model_path(key)
        written = write_artifact(artifact, path, force=True)
        ev = final[-1]
        entry = ModelEntry(key, self.cache.relative(path), _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db),
                           _r(self.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db)),
                           self.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db), round(time.perf_counter() - t0, 1))
        steps = recipe.steps - recipe.from_steps
        if steps and not recipe.sparsity:
            self.costs.observe("distill_step", report.seconds.get("finetune", 0.0), steps)
        if not recipe.from_steps and not recipe.sparsity:
            self.costs.observe("prune", report.seconds.get("prune", 0.0))
        self.cache.store(key, {"file": entry.file, "entry": entry.to_dict()}, written)
        # the model as its file would open, from the bytes just written: the file is never read back
        return self._remember(key, model_from_bytes(path, written.content), entry)

    def weight_bytes(self, recipe: Recipe, parent: LoadedModel) -> int:
        """A lower bound of ``recipe``'s file size: its conv weights alone at its bits per weight."""
        n = sum(m.weight.numel() for m in parent.module.modules() if isinstance(m, _STORED))
        bits = storage_bits(recipe.export_config().weight_mode)
        return int((1.0 - recipe.sparsity) * n * bits / 8 + (n / 8 if recipe.sparsity else 0))

    # -- candidates -----------------------------------------------------------------------------------------
    def cached_candidate(self, recipe: Recipe) -> Candidate | None:
        cand = self.cache.load(recipe.key, lambda record: Candidate.from_record(record, self.budget))
        return None if cand is None else self._found(cand)

    def _found(self, cand: Candidate) -> Candidate:
        self.candidates.append(cand)
        self.on_row(cand)
        return cand

    def candidate_work(self, recipe: Recipe) -> dict[str, float]:
        if recipe.is_cpu:
            return {"quantize": 1, "score": 1}
        work = {f"export:{recipe.export_config().format}": 1, "score": 1}
        if recipe.gptq:
            work["gptq"] = 1
        if recipe.bits_by_layer:
            work["bits"] = 1
        if recipe.fit_steps:
            work["fit_step"] = recipe.fit_steps
        return work

    def make_candidate(self, recipe: Recipe, model: LoadedModel) -> Candidate:
        """Make and score ``recipe``'s file from its float model (raises UnsupportedError when it cannot be)."""
        t0 = time.perf_counter()
        folder = self.cache.file_dir(recipe.key)
        shutil.rmtree(folder, ignore_errors=True)  # a half-made earlier attempt
        path = folder / TARGET_FILES[recipe.target]
        cand, file = self._cpu(recipe, model, path) if recipe.is_cpu else self._coreml(recipe, model, path)
        cand.seconds = round(time.perf_counter() - t0, 1)
        self.cache.store(recipe.key, cand.to_dict(), file)
        return self._found(cand)

    def int8_model(self, key: str) -> LoadedModel:
        """The int8 model of candidate ``key``: as made in this run, else opened from the bytes the cache
        read when it checked the file."""
        if key not in self._int8:
            file = self.cache.file(key)
            self._int8[key] = model_from_bytes(file.path, file.content)
        return self._int8[key]

    def _measured(self, recipe: Recipe, path: Path, file: WrittenFile, ev: Evaluation, **extra: Any) -> Candidate:
        return Candidate(recipe, self.cache.relative(path), file.size_bytes, file.zipped_bytes,
                         _r(ev.target_psnr_db), _r(ev.fidelity_psnr_db), _r(ev.worst_fidelity_db),
                         _r(self.budget.quality(ev.target_psnr_db, ev.fidelity_psnr_db)),
                         self.budget.keeps(ev.target_psnr_db, ev.fidelity_psnr_db), 0.0, **extra)

    def _coreml(self, recipe: Recipe, model: LoadedModel, path: Path) -> tuple[Candidate, WrittenFile]:
        config = recipe.export_config()
        if recipe.fit_steps:
            config = with_fitted_palettes(config, recipe.fit_steps, self.cfg.calib)
        if (recipe.bits_by_layer or recipe.gptq) and self.cfg.calib:
            config = dataclasses.replace(config, calib=str(self.cfg.calib))  # chosen / calibrated on them
        t0 = time.perf_counter()
        result = export_loaded(model, path, config, force=True, progress=self.progress, fits=self.fits)
        self._observe_export(recipe, config.format, time.perf_counter() - t0, result)
        file = result.file
        assert file is not None and result.stored_weights is not None
        twin = file_twin(model, result.stored_weights, config.format)
        if twin is None:
            runner = open_runner(path)
            ev = self.score(runner, f"scoring {recipe.key} as a file")
            return self._measured(recipe, path, file, ev, notes=list(result.notes), scored_with=runner.engine), file
        ev = self.score(twin, f"scoring {recipe.key}")
        return self._measured(recipe, path, file, ev, notes=list(result.notes), scored_with=TWIN), file

    def _observe_export(self, recipe: Recipe, fmt: str, seconds: float, result: Any) -> None:
        """The export's seconds, split between the plain export and what a recipe adds to it."""
        kind = f"export:{fmt}"
        extra = {k: v for k, v in self.candidate_work(recipe).items() if k not in (kind, "score")}
        if not extra:
            self.costs.observe(kind, seconds)
            return
        rest = max(0.0, seconds - self.costs.per(kind))
        if recipe.gptq and result.palette_gptq and not result.palette_gptq.get("reused"):
            gptq_s = min(rest, float(result.palette_gptq.get("seconds") or rest))
            self.costs.observe("gptq", gptq_s)
            rest -= gptq_s
        if recipe.fit_steps and result.palette_fit and "fit_step" in extra:
            fit_s = min(rest, float(result.palette_fit.get("seconds") or rest))
            self.costs.observe("fit_step", fit_s, recipe.fit_steps)
            rest -= fit_s
        if recipe.bits_by_layer:
            self.costs.observe("bits", rest)

    def _cpu(self, recipe: Recipe, model: LoadedModel, path: Path) -> tuple[Candidate, WrittenFile]:
        scores = self.scores
        command = " && ".join(recipe.commands(shown(Path(self.original.path)), path.name, self.cfg,
                                              torch.get_num_threads()))
        qcfg = self.cfg.quantize_config()
        t0 = time.perf_counter()
        # With --backend auto the engines are ranked and the file made in one run; the ranking leaves the
        # calibration as a run with the chosen engine pinned does it, so the printed command (engine
        # pinned) makes this very file.
        result = quantize_loaded(model, path, qcfg, force=True, progress=self.progress,
                                 command=command, source_bytes=model.content or None, scores=scores)
        written, file = result.written, result.file
        assert written is not None and file is not None
        self._int8[recipe.key] = written
        t1 = time.perf_counter()
        ev = scores.score(written.module, runner_for(written), "scoring int8", reference=self.reference.outputs)
        self.costs.observe("score", time.perf_counter() - t1)
        self.costs.observe("quantize", t1 - t0)
        return self._measured(recipe, path, file, ev, latency_ms=_r(result.latency["int8"]["p50_ms"]),
                              engine=result.engine, threads=result.latency["threads"], backend=result.backend,
                              notes=list(result.notes)), file
