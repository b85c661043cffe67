"""The search behind ``tbopt optimize`` (:mod:`.optimize`): its state and its order -- which float models
are made, which files are tried for each target and when a branch stops -- and how each candidate is
made and scored. Choosing among the candidates and writing the results is :mod:`.optimize`'s.
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

from ..core.artifact import save_artifact
from ..core.checkpoint import LoadedModel, load_model
from ..core.errors import TbOptError, UnsupportedError
from ..core.files import size_on_disk, zipped_size
from ..core.images import ImageSet
from ..core.progress import Progress
from ..core.quality import made_up
from ..coreml.weights import carry_file_weights, stored_weights
from ..export.config import ExportConfig, storage_bits
from ..export.prepare import coreml_ready_module
from ..measure.evaluate import Evaluation, Scores, evaluate
from ..prune.layers import full_resolution_convs
from ..runtime.runners import TorchRunner, open_runner, runner_for
from .export import export_loaded
from .optimize_cache import SearchCache
from .optimize_config import TARGET_FILES, Budget, OptimizeConfig, Recipe
from .optimize_result import Candidate, ModelEntry
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


def file_twin(model: LoadedModel, path: Path, fmt: str) -> TorchRunner | None:
    """The Core ML file at ``path`` (exported from ``model`` with image I/O) as a PyTorch runner carrying
    its stored weights; None when the converter folded ops into those weights (a scale after a conv):
    no PyTorch model with them computes what the file does, and the file itself must be run."""
    size = model.preprocessing.size
    twin = coreml_ready_module(model.module, size, fmt)
    match = carry_file_weights(twin, stored_weights(path), torch.zeros(1, 3, size, size))
    if match.rewritten:
        return None
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
        self.reference: Evaluation = evaluate(TorchRunner(loaded.module.eval(), prep, name=str(loaded.path)), images,
                                              progress=progress,
                                              description="scoring the original")
        self.budget = Budget(_r(self.reference.target_psnr_db), cfg.max_drop_db, cfg.min_fidelity_db)
        self._models: dict[str, LoadedModel | None] = {"original": loaded}
        size = prep.size
        self.full_res = tuple(full_resolution_convs(copy.deepcopy(loaded.module), torch.zeros(1, 3, size, size)))

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
        entry = self.cache.load(key, ModelEntry.from_record)
        if entry is not None:
            psnr, fid = entry.target_psnr_db, entry.fidelity_psnr_db
            entry = dataclasses.replace(entry, quality_db=self.budget.quality(psnr, fid),
                                        kept=self.budget.keeps(psnr, fid), cached=True)
        elif not self.time_left(self.expected_seconds(recipe)):
            self.later(key)
            self._models[key] = None
            return None
        else:
            t0 = time.perf_counter()
            cfg = recipe.sparse_config(self.cfg.seed) if recipe.sparsity else recipe.prune_config(self.cfg.seed)
            original = self.original.module

            def scorer(module: nn.Module, reference: np.ndarray | None, description: str, label: str) -> Evaluation:
                if module is original:  # scored once, at the start
                    return self.reference
                return evaluate(TorchRunner(module.eval(), source.preprocessing, name=label), self.images,
                                reference=reference, progress=self.progress, description=description)

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
        cand = self.cache.load(recipe.key, lambda record: Candidate.from_record(record, self.budget))
        if cand is None:
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
        twin = file_twin(model, path, config.format)
        if twin is None:
            runner = open_runner(path)
            ev = self.score(runner, f"scoring {recipe.key} as a file")
            return self._measured(recipe, path, ev, notes=list(result.notes), scored_with=runner.engine)
        ev = self.score(twin, f"scoring {recipe.key}")
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

    def full_res_branch(self, rate: float, steps: int, targets: list[str]) -> None:
        """A rate that kept the quality after the longest distillation, again with the groups of the
        full-resolution convs pruned harder (for the CPU first: that is what it is for)."""
        if not self.full_res:
            return
        for full_res_rate in (r for r in self.cfg.full_res_rates if r > rate):
            recipe = Recipe(target=targets[0], rate=rate, steps=steps, full_res_rate=full_res_rate,
                            full_res=self.full_res)
            if self.model(recipe) is None:
                break  # missed (a harder rate would too) or no time left
            for target in sorted(targets, key=lambda t: t != "cpu"):
                self.storage_branch(recipe, target)

    def run(self) -> None:
        targets = [t for t in self.cfg.targets if t != "cpu"] + [t for t in self.cfg.targets if t == "cpu"]
        original = Recipe(target=targets[0])
        for target in targets:
            self.storage_branch(original, target)
        rates = self.cfg.rates
        longest = max(self.cfg.resolved_steps())
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
                if steps == longest:  # before the next rate's long distillation: the time budget may end there
                    self.full_res_branch(rate, steps, targets)
            rates = tuple(kept_rates)  # a longer distillation only where the shorter one kept the quality
        self.rescue()
        for base in self.to_sparsify:
            self.sparse_branch(base)
