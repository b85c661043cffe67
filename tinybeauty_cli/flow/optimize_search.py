"""The order of the search behind ``tbopt optimize`` (:mod:`.optimize`): what to try next, whether it
still fits the time budget, and when a branch stops. How a float model or a candidate file is made,
scored and timed is :mod:`.optimize_make`'s; the seconds each kind of work takes are the cost model's
(:mod:`.optimize_cost`), measured on this run.

The order is the same on every machine -- cheap and likely gains first -- and a step that the cost
model expects to end after the time budget is not started (it is listed, with its expected
seconds); cheaper steps after it still are. So a slower machine makes the same steps in the same
order and reaches the same files, later, as far as its budget goes:

1. the model as given, per target: palettes from 4 bits down to the first that misses; that palette
   and the smaller ones again with GPTQ entries (``--palette-method gptq``: the same bytes, seconds
   to make); up towards 8 bits and int8 only when 4 bits missed both ways; int8 TorchScript for ``cpu``;
2. channel pruning at the first rate after the short distillation. Kept: the same storage search,
   then the next rates. Missed: what can rescue it -- the distillation continued from the short one
   to the long one (``tbopt prune --continue-from``), and the rates below the first
   (``lower_rates``);
3. the long distillation, continued from the short one, for each rate that kept the quality, each
   with its storage search and, for the CPU, its full-resolution variant;
4. the dear storage for the palettes GPTQ also missed (:mod:`.optimize_rescue`): bits by layer and
   fitted palettes, the smallest files first, never one whose weights alone outweigh the smallest file kept;
5. weights zeroed and stored sparse (ML Programs); the model as given in 8-bit weights (or fp16 when
   that misses) for a target where nothing kept the quality.

Each step's expected seconds include what the search must still do after it: scoring each chosen
Core ML file as tbopt bench runs it and timing the int8 files side by side (``reserve``).

It stops when the space is exhausted or nothing left fits the budget, and says which (:attr:`Search.stopped`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

from ..core.checkpoint import LoadedModel
from ..core.errors import UnsupportedError
from ..core.images import ImageSet
from ..core.progress import Progress
from ..measure.evaluate import Evaluation
from .optimize_cache import SearchCache
from .optimize_config import OptimizeConfig, Recipe
from .optimize_cost import Clocked, CostModel, OutOfTime
from .optimize_make import TWIN, Maker, OnRow, file_twin, shown, with_fitted_palettes
from .optimize_rescue import FIT_REACH_DB, DearStorage
from .optimize_result import Candidate, ModelEntry

__all__ = ["FIT_REACH_DB", "TWIN", "Search", "file_twin", "shown", "with_fitted_palettes"]

#: The palette a storage search starts from, going down while it keeps the quality and up when it
#: does not: every scoring counts on a slow machine, and on TinyBeauty 4-bit palettes (with GPTQ)
#: keep a 0.3 dB budget on the model as given and after channel pruning, where 8 and 6 bits
#: always do and only add files that cannot be chosen.
START_PALETTE = "pal4"


#: A continued distillation shortened to fit the time budget keeps at least this share of its
#: planned extra steps (fewer would not lift the model much above the shorter one), in whole
#: multiples of ``STEP_QUANTUM`` (so that a resumed or replayed search finds the same recipe).
MIN_CONTINUED_SHARE = 0.5
STEP_QUANTUM = 50


class Search(DearStorage):
    """The search's order and clock; :attr:`maker` makes and scores what it decides to try."""

    def __init__(self, loaded: LoadedModel, images: ImageSet, cfg: OptimizeConfig, cache: SearchCache,
                 progress: Progress, on_row: OnRow | None, started: float | None = None):
        self.cfg, self.costs = cfg, CostModel()
        self.t_start = time.perf_counter() if started is None else started
        self.maker = Maker(loaded, images, cfg, cache, progress, on_row, self.costs)
        self.skipped: list[dict[str, str]] = []
        self.not_tried: list[dict[str, Any]] = []
        self.to_rescue: list[tuple[Recipe, list[str]]] = []  # (model and target, palettes GPTQ missed)
        self.to_sparsify: list[Recipe] = []
        self.to_climb: list[tuple[Recipe, list[str]]] = []  # a pruned model's larger palettes, tried late
        self.continued: dict[tuple[float, int], Recipe] = {}  # (rate, planned steps) -> the continuation made
        self.predicted: set[str] = set()  # recipes skipped as sure misses (:meth:`predicted_miss`)
        self.stopped = ""

    # what was found, and how it is scored, is the maker's
    candidates = property(lambda self: self.maker.candidates)
    models = property(lambda self: self.maker.models)
    budget = property(lambda self: self.maker.budget)
    reference = property(lambda self: self.maker.reference)
    original = property(lambda self: self.maker.original)
    images = property(lambda self: self.maker.images)
    cache = property(lambda self: self.maker.cache)
    progress = property(lambda self: self.maker.progress)

    def score(self, runner: Any, description: str) -> Evaluation:
        """A chosen file scored as tbopt bench runs it (its seconds are the cost model's ``verify``)."""
        return self.maker.score(runner, description, kind="verify")

    # -- the clock ----------------------------------------------------------------------------------------
    def seconds_left(self) -> float | None:
        budget = self.cfg.time_budget_s
        return None if budget is None else budget - (time.perf_counter() - self.t_start)

    def reserve(self) -> float:
        """Seconds the end of the search is expected to take: each Core ML target's chosen file scored
        as a file (the reference executor off macOS), the int8 files timed side by side and the chosen
        one again in a plain process, and the reports written."""
        coreml = sum(t != "cpu" for t in self.cfg.targets)
        cpu = 1 if "cpu" in self.cfg.targets else 0
        return self.costs.estimate({"verify": coreml, "timing": cpu, "plain": cpu, "report": 1})

    def fits(self, key: str, work: dict[str, float]) -> bool:
        """True when ``work`` is expected (by the cost model) to end within the time budget, the end of
        the search included (:meth:`reserve`); else it is listed as not tried, with its expected seconds."""
        left = self.seconds_left()
        left = None if left is None else left - self.reserve()
        expected = self.costs.estimate(work)
        if left is None or (left > 0 and expected < left):
            return True
        if not any(n["key"] == key for n in self.not_tried):
            self.not_tried.append({"key": key, "expected_s": round(expected, 1), "left_s": round(max(left, 0.0), 1),
                                   "reason": "time budget: expected to end after it" if left > 0
                                   else "time budget reached before it was started"})
        return False

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})

    # -- float models ---------------------------------------------------------------------------------------
    def made(self, recipe: Recipe) -> tuple[LoadedModel, ModelEntry] | None:
        """``recipe``'s float model, made now if it fits the time budget (kept or not); None when there
        was no time, or its source was not made."""
        key = recipe.model_key
        known = self.maker.known_model(key)
        if known is not None or not recipe.rate and not recipe.sparsity:
            return known if known is not None else (self.original, None)  # type: ignore[return-value]
        shorter = None
        if recipe.sparsity:
            source = self.model(dataclasses.replace(recipe, sparsity=0.0))  # zeroed in the kept (pruned) model
        else:
            source = self.original
            if recipe.from_steps:
                made = self.made(recipe.shorter)
                shorter = made[0] if made is not None else None
                if shorter is None:
                    return None
        if source is None:
            return None
        if not self.fits(key, self.maker.model_work(recipe)):
            return None
        return self.clocked(key, lambda: self.maker.make_model(recipe, source, shorter))

    def clocked(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, stopped at the time budget's end (None then, and listed as not tried): a step the
        cost model expected to fit may not, when the machine slows down mid-search."""
        left = self.seconds_left()
        if left is None:
            return make()
        inner = self.maker.progress
        self.maker.progress = Clocked(inner, time.perf_counter() + left)
        t0 = time.perf_counter()
        try:
            return make()
        except OutOfTime as exc:
            self.not_tried.append({"key": key, "expected_s": None, "left_s": 0.0,
                                   "reason": f"stopped at the time budget's end after {time.perf_counter() - t0:.0f} s "
                                             f"of {exc} (the machine ran slower than the cost model expected)"})
            return None
        finally:
            self.maker.progress = inner

    def model(self, recipe: Recipe) -> LoadedModel | None:
        """``recipe``'s float model when it was made and keeps the budget; else None (its branch stops)."""
        made = self.made(recipe)
        if made is None or (made[1] is not None and not made[1].kept):
            return None
        return made[0]

    def missed(self, recipe: Recipe) -> bool:
        """True when ``recipe``'s float model was made and misses the budget."""
        known = self.maker.known_model(recipe.model_key)
        return known is not None and not known[1].kept

    def cannot_beat(self, recipe: Recipe) -> bool:
        """True (and noted) when ``recipe``'s conv weights alone, at its bits per weight, take at least
        as many bytes as the smallest file within the budget found so far for its target."""
        kept = [c for c in self.candidates if c.recipe.target == recipe.target and c.kept]
        parent = self.model(dataclasses.replace(recipe, sparsity=0.0)) if kept else None
        if parent is None:
            return False
        bound = self.maker.weight_bytes(recipe, parent)
        best = min(kept, key=lambda c: c.size_bytes)
        if bound < best.size_bytes:
            return False
        self.skip(recipe.key, f"its weights alone take at least {bound:,} bytes; {best.recipe.key} is "
                              f"{best.size_bytes:,} bytes")
        return True

    # -- candidates -----------------------------------------------------------------------------------------
    def candidate(self, recipe: Recipe, past_budget: bool = False) -> Candidate | None:
        """Evaluate ``recipe`` (or read it from the cache); None when it could not be tried.
        ``past_budget``: made even when the time budget is spent (a target's one shippable file)."""
        cached = self.maker.cached_candidate(recipe)
        if cached is not None:
            return cached
        if not recipe.is_cpu and self.cannot_beat(recipe):
            return None
        model = self.model(recipe)
        if model is None or self.predicted_miss(recipe):
            return None
        if not (past_budget or self.fits(recipe.key, self.maker.candidate_work(recipe))):
            return None
        try:
            if recipe.fit_steps and not past_budget:
                return self.clocked(recipe.key, lambda: self.maker.make_candidate(recipe, model))
            return self.maker.make_candidate(recipe, model)
        except UnsupportedError as exc:
            self.skip(recipe.key, str(exc))
            return None

    def predicted_miss(self, recipe: Recipe) -> bool:
        """True (and noted) when ``recipe`` stores a changed model (pruned or zeroed) in a way that, on the
        model as given, lost more than twice this model's margin above the budget line: the storage's
        error, measured in this search on the model as given, counted at half (target PSNR: its drop in
        dB; fidelity: its squared error, which adds to the model's own)."""
        if not (recipe.rate or recipe.sparsity):
            return False
        if recipe.key in self.predicted:
            return True
        known = self.maker.known_model(recipe.model_key)
        plain = dataclasses.replace(recipe, rate=0.0, steps=0, from_steps=0, sparsity=0.0, full_res_rate=0.0)
        twins = [c for c in self.candidates if c.recipe == plain and c.quality_db is not None]
        if known is None or known[1].quality_db is None or not twins:
            return False
        q_model, q_twin, line = known[1].quality_db, twins[0].quality_db, self.budget.line_db
        if self.budget.uses_targets:
            lost = self.reference.target_psnr_db - q_twin
            predicted = q_model - lost / 2
        else:  # fidelity to the original: the model's error and the storage's add up
            lost = float("inf")
            predicted = -10.0 * math.log10(10 ** (-q_model / 10) + 10 ** (-q_twin / 10) / 2)
        if lost <= 0 or predicted >= line:
            return False
        self.predicted.add(recipe.key)
        self.skip(recipe.key, (f"{recipe.storage} cost the model as given {lost:.2f} dB; " if lost != float("inf")
                               else f"{recipe.storage} keeps {q_twin:.2f} dB of the model as given; ")
                  + f"{recipe.model_key} is {q_model - line:+.2f} dB from the budget's line: even half that "
                    f"loss would take it below")
        return True

    def down_while_kept(self, base: Recipe, modes: list[str], **variant: Any) -> list[str]:
        """``base`` stored in ``modes`` (largest first, with ``variant``) until one misses; the modes from
        that miss on (empty when all kept or a step was not made)."""
        for i, mode in enumerate(modes):
            recipe = dataclasses.replace(base, weights=mode, **variant)
            cand = None if self.predicted_miss(recipe) else self.candidate(recipe)
            if cand is None and recipe.key not in self.predicted:
                return []
            if cand is None or not cand.kept:
                for rest in modes[i + 1:]:
                    self.skip(dataclasses.replace(base, weights=rest, **variant).key, f"{mode} missed the budget")
                return modes[i:]
        return []

    # -- the order of the search ------------------------------------------------------------------------------
    def storage_branch(self, model_recipe: Recipe, target: str) -> None:
        """The storage of one float model for one target, from the middle palette (``START_PALETTE``)
        down while it keeps the quality; the first palette that misses and the smaller ones again with
        GPTQ entries (same bytes); when even the middle one misses with GPTQ, up towards 8 bits and
        int8 until one keeps. What GPTQ missed too is remembered for :meth:`rescue`."""
        base = dataclasses.replace(model_recipe, target=target)
        if target == "cpu":
            self.candidate(dataclasses.replace(base, weights="int8"))
            return
        modes = self.cfg.storage_modes(target)
        start = modes.index(START_PALETTE) if START_PALETTE in modes else 0
        missed = self.down_while_kept(base, modes[start:])
        if missed and self.cfg.gptq:
            missed = self.down_while_kept(base, missed, gptq=True)
        if missed:
            self.to_rescue.append((base, missed))
        if missed and missed[0] == modes[start]:  # nothing kept from the middle down: larger storage
            up = [*reversed(modes[:start]), "int8"]
            if base.rate:  # after the longer distillations, which may keep the middle palette
                self.to_climb.append((base, up))
            else:
                self.climb(base, up)
        self.to_sparsify.append(base)  # after the dear palettes: sparse fp16 has not won on TinyBeauty

    def climb(self, base: Recipe, modes: list[str]) -> None:
        """``base`` stored in ``modes`` (smallest first) until one keeps the quality."""
        for mode in modes:
            cand = self.candidate(dataclasses.replace(base, weights=mode))
            if cand is not None and cand.kept:
                break

    def kept_middle(self, model_recipe: Recipe, targets: list[str]) -> bool:
        """True when some Core ML target kept the quality with ``model_recipe``'s model stored in the
        palette its storage search starts from (``START_PALETTE``, or the largest one given when that is
        not; plain or GPTQ), or no Core ML target is searched."""
        coreml = [t for t in targets if t != "cpu"]
        first = {t: START_PALETTE if START_PALETTE in modes else (modes[0] if modes else None)
                 for t in coreml for modes in [self.cfg.storage_modes(t)]}
        return not coreml or any(
            c.kept and c.recipe.target in first and c.recipe.weights == first[c.recipe.target]
            and not c.recipe.fit_steps and not c.recipe.bits_by_layer
            and c.recipe.model_key == model_recipe.model_key for c in self.candidates)

    def fallback(self, targets: list[str]) -> None:
        """For each Core ML target where nothing kept the quality, the model as given stored in 8-bit
        linear weights (half fp16's bytes, no calibration), and in fp16 when even that misses: made
        even past the time budget (a few seconds each), so that no target is left without a file."""
        for target in targets:
            for weights in ("int8", "fp16"):
                if target != "cpu" and not any(c.kept for c in self.candidates if c.recipe.target == target):
                    self.candidate(Recipe(target=target, weights=weights), past_budget=True)

    def run(self) -> None:
        targets = [t for t in self.cfg.targets if t != "cpu"] + [t for t in self.cfg.targets if t == "cpu"]
        for target in targets:
            self.storage_branch(Recipe(target=targets[0]), target)
        steps = self.cfg.resolved_steps()
        kept = self.short_distillations(targets, steps)
        for longer in steps[1:]:
            kept = self.longer_distillations(targets, kept, steps[0], longer)
        for base, modes in self.to_climb:
            self.climb(base, modes)
        self.rescue()
        for base in self.to_sparsify:
            self.sparse_branch(base)
        self.fallback(targets)
        self.stopped = self.why_stopped()

    def short_distillations(self, targets: list[str], steps: tuple[int, ...]) -> list[float]:
        """Channel pruning, rates ascending, after the short distillation (``steps[0]``); the rates that
        kept the quality. A rate whose model keeps the quality but not in the middle palette for any
        Core ML target has its distillation continued at once (a higher rate at the same length would
        lose more, and the longer one is what can still win); the higher rates are left out, as they
        are when the last kept rate's loss, scaled to theirs, already crosses the line
        (:meth:`rate_predicted_to_miss`; the kept rate is continued instead). When the
        first rate misses: its distillation continued later (:meth:`longer_distillations`) and the rates
        below it now. With one length only, each kept rate gets its full-resolution variant here."""
        rates, short = self.cfg.rates, steps[0]
        kept: list[float] = []
        for i, rate in enumerate(rates):
            recipe = Recipe(target=targets[0], rate=rate, steps=short)
            why = self.rate_predicted_to_miss(kept, recipe)
            if why:
                self.skip_rates(rates[i:], recipe, why)
                if len(steps) > 1:
                    self.continue_rate(targets, kept[-1], short, steps[1])
                break
            if self.model(recipe) is None:
                if self.missed(recipe):
                    self.skip_rates(rates[i + 1:], recipe, f"channel pruning at {rate:g} already misses the budget")
                    kept.append(-rate)  # to be rescued by a longer distillation, if one keeps it
                    if i == 0:
                        kept += self.lower_rates(targets, short)
                    break
                continue
            kept.append(rate)
            for target in targets:
                self.storage_branch(recipe, target)
            if len(steps) == 1:
                self.full_res_branch(recipe, targets)
            elif not self.kept_middle(recipe, targets):
                self.continue_rate(targets, rate, short, steps[1])
                self.skip_rates(rates[i + 1:], recipe, f"channel pruning at {rate:g} after {short} steps keeps no "
                                                       f"{START_PALETTE} file: a higher rate would lose more")
                break
        return kept

    def rate_predicted_to_miss(self, kept: list[float], recipe: Recipe) -> str:
        """Why ``recipe``'s rate is sure to miss at its distillation length, or "": the last kept rate's
        loss (PSNR drop, or squared error against the original) scaled in proportion to the rate --
        an optimistic guess, since a model loses faster than its rate grows -- already crosses the
        budget's line."""
        known = self.maker.known_model(dataclasses.replace(recipe, rate=kept[-1]).model_key) if (
            kept and kept[-1] > 0) else None
        prev = known[1] if known is not None else None
        if prev is None or prev.quality_db is None:
            return ""
        scale = recipe.rate / kept[-1]
        if self.budget.uses_targets:
            lost = self.reference.target_psnr_db - prev.quality_db
            if lost <= 0:
                return ""
            predicted = self.reference.target_psnr_db - lost * scale
        else:  # the squared error against the original grows with the rate
            predicted = prev.quality_db - 10.0 * math.log10(scale)
        if predicted >= self.budget.line_db:
            return ""
        return (f"channel pruning at {kept[-1]:g} after {recipe.steps} steps is {prev.quality_db - self.budget.line_db:.2f} "
                f"dB above the budget's line; at {recipe.rate:g}, even in proportion to the rate, it would end "
                f"{self.budget.line_db - predicted:.2f} dB below")

    def skip_rates(self, rates: tuple[float, ...], recipe: Recipe, reason: str) -> None:
        for rest in rates:
            self.skip(f"*/{dataclasses.replace(recipe, rate=rest).model_key}/*", reason)

    def lower_rates(self, targets: list[str], steps: int) -> list[float]:
        """Rates below the first, highest first, after the short distillation (the first missed)."""
        kept = []
        for rate in self.cfg.lower_rates:
            recipe = Recipe(target=targets[0], rate=rate, steps=steps)
            if self.model(recipe) is None:
                continue
            kept.append(rate)
            for target in targets:
                self.storage_branch(recipe, target)
            break  # the highest rate below the first that keeps the quality: lower ones are larger
        return kept

    def continued_recipe(self, targets: list[str], rate: float, shorter: int, steps: int) -> Recipe:
        """The distillation of ``rate`` continued from ``shorter`` to ``steps`` steps -- or to fewer, when
        the time left (after the end of the search and the storage of the model it makes) holds at least
        :data:`MIN_CONTINUED_SHARE` of the extra steps but not all: a slower machine then gets a shorter
        continuation rather than none."""
        recipe = Recipe(target=targets[0], rate=rate, steps=steps, from_steps=shorter)
        left = self.seconds_left()
        if left is None or self.maker.known_model(recipe.model_key) is not None:
            return recipe
        after = self.costs.estimate(self.follow_up(targets)) + self.reserve()
        per_step = self.costs.per("distill_step")
        if per_step <= 0:
            return recipe
        fit = int((left - after - self.costs.per("score")) / per_step)
        extra = steps - shorter
        if fit >= extra or fit < MIN_CONTINUED_SHARE * extra:
            return recipe  # all of it, or too little to be worth it (the budget check lists it)
        return dataclasses.replace(recipe, steps=shorter + fit // STEP_QUANTUM * STEP_QUANTUM)

    def follow_up(self, targets: list[str]) -> dict[str, float]:
        """The least storage work a new float model is worth making for: each Core ML target's middle
        palette with GPTQ (the tables fitted once), the int8 file for the CPU."""
        work: dict[str, float] = {}
        for target in targets:
            if target == "cpu":
                work["quantize"] = work.get("quantize", 0) + 1
            else:
                kind = f"export:{Recipe(target=target).export_config().format}"
                work[kind] = work.get(kind, 0) + 1
                work["gptq"] = 1
            work["score"] = work.get("score", 0) + 1
        return work

    def continue_rate(self, targets: list[str], rate: float, shorter: int, steps: int) -> bool:
        """``rate``'s distillation continued (:meth:`continued_recipe`) and stored for every target; True
        when its model keeps the quality."""
        recipe = self.continued_recipe(targets, rate, shorter, steps)
        self.continued[(rate, steps)] = recipe
        if self.model(recipe) is None:
            return False
        for target in targets:
            self.storage_branch(recipe, target)
        return True

    def longer_distillations(self, targets: list[str], rates: list[float], shorter: int, steps: int) -> list[float]:
        """The distillation of each rate continued from ``shorter`` to ``steps`` steps, the highest rate
        first (its files are the smallest and fastest, so its continuation can win the most; a rate the
        short one missed, negative in ``rates``, to rescue it); each model that keeps the quality gets
        the storage search and its full-resolution variant. A rate continued early
        (:meth:`short_distillations`) is not made again."""
        kept = []
        for signed in sorted(rates, key=abs, reverse=True):
            rate = abs(signed)
            early = self.continued.get((rate, steps))
            if early is not None:
                recipe = early
                if self.model(recipe) is None:
                    continue
            elif not self.continue_rate(targets, rate, shorter, steps):
                continue
            else:
                recipe = self.continued[(rate, steps)]
            kept.append(rate)
            self.full_res_branch(recipe, targets)
        return kept

    def full_res_branch(self, model_recipe: Recipe, targets: list[str]) -> None:
        """A rate that kept the quality after the longest distillation, again with the groups of the
        full-resolution convs pruned harder (for the CPU first: that is what it is for)."""
        if not self.maker.full_res:
            return
        for full_res_rate in (r for r in self.cfg.full_res_rates if r > model_recipe.rate):
            recipe = Recipe(target=targets[0], rate=model_recipe.rate, steps=model_recipe.steps,
                            full_res_rate=full_res_rate, full_res=self.maker.full_res)
            if self.model(recipe) is None:
                break  # missed (a harder rate would too) or no time left
            for target in sorted(targets, key=lambda t: t != "cpu"):
                self.storage_branch(recipe, target)

    def why_stopped(self) -> str:
        """Why the search ended, in a sentence for the result."""
        spent = time.perf_counter() - self.t_start
        if self.not_tried:
            return (f"the time budget: {len(self.not_tried)} step(s) were expected to end after it and were not "
                    f"started (after {spent:.0f} s; listed with their expected seconds)")
        return (f"the space was exhausted after {spent:.0f} s: every step was made, or ruled out because a cheaper "
                f"step of its branch missed the budget or its weights alone could not beat a file already kept")
