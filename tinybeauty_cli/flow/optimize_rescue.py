"""The dear part of the search's order (:mod:`.optimize_search`): for the palettes GPTQ also missed,
bits chosen by layer in the same bytes and then fitted palettes, the smallest files first; and weights
zeroed and stored sparse. :class:`DearStorage` is a part of :class:`.optimize_search.Search`, which
holds the state these methods read (what was tried, the maker, the budget).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.errors import TbOptError
from .optimize_config import Recipe


#: The most PSNR fitted palettes recovered over plain ones in our measurements (1.6 dB: the demo,
#: pal4, 300 steps); a palette further below the budget is not fitted.
FIT_REACH_DB = 2.0


class DearStorage:
    """Rescue and sparse storage, the last steps of :meth:`.optimize_search.Search.run`."""

    to_rescue: list[tuple[Recipe, list[str]]]

    def rescue(self) -> None:
        """The dear part, for the palettes GPTQ missed too: bits chosen by layer (same bytes), then
        fitted palettes, model by model and target by target, the smallest files first, going down a
        palette size while one keeps the quality. Nothing whose weights alone cannot beat the smallest
        file kept so far is made (:meth:`cannot_beat`), nor a fit of a palette too far below the budget."""
        def promise(item: tuple[Recipe, list[str]]) -> tuple[int, float]:
            base, modes = item
            model = self.model(base)
            closest = self.closest(dataclasses.replace(base, weights=modes[0]))
            return (self.maker.weight_bytes(dataclasses.replace(base, weights=modes[0]), model) if model else 0,
                    -(closest if closest is not None else float("-inf")))

        for base, modes in sorted(self.to_rescue, key=promise):
            for mode in modes:
                if not any(c is not None and c.kept for c in self.rescue_variants(dataclasses.replace(base, weights=mode))):
                    break

    def rescue_variants(self, recipe: Recipe) -> Any:
        """The dear variants of one palette, in order, until one keeps the quality."""
        variants = []
        if self.cfg.bits_by_layer and self.bits_available(recipe):
            variants.append(dataclasses.replace(recipe, bits_by_layer=True))
        if self.cfg.fit_steps:
            variants.append(dataclasses.replace(recipe, gptq=self.cfg.gptq, fit_steps=self.cfg.fit_steps))
        for variant in variants:
            closest = self.closest(recipe)
            if variant.fit_steps and closest is not None and closest < self.budget.line_db - FIT_REACH_DB:
                self.skip(variant.key, f"{recipe.storage} is more than {FIT_REACH_DB:g} dB below the budget, "
                                       f"more than fitting has recovered")
                continue
            cand = self.candidate(variant)
            yield cand
            if cand is not None and cand.kept:
                return

    def closest(self, recipe: Recipe) -> float | None:
        """The best quality of ``recipe``'s palette without fitting (plain, GPTQ or bits by layer)."""
        plain = dataclasses.replace(recipe, gptq=False, bits_by_layer=False, fit_steps=0)
        qs = [c.quality_db for c in self.candidates if c.quality_db is not None and not c.recipe.fit_steps
              and dataclasses.replace(c.recipe, gptq=False, bits_by_layer=False) == plain]
        return max(qs) if qs else None

    def bits_available(self, recipe: Recipe) -> bool:
        """True when ``tbopt export`` can choose palette bits by layer for ``recipe``'s file."""
        try:
            dataclasses.replace(recipe, bits_by_layer=True).export_config()
        except TbOptError:
            return False
        return True

    def sparse_branch(self, base: Recipe) -> None:
        """Weights zeroed (global magnitude) and stored sparse in fp16: ML Programs only."""
        if base.target == "ios13":
            return
        for i, s in enumerate(self.cfg.sparsities):
            recipe = dataclasses.replace(base, sparsity=s, weights="fp16")
            cand = self.candidate(recipe)
            if (cand is not None and not cand.kept) or self.missed(recipe):
                for rest in self.cfg.sparsities[i + 1:]:
                    self.skip(dataclasses.replace(base, sparsity=rest, weights="fp16").key,
                              f"sparsity {s:g} missed the budget")
                break
