"""Recipe replay (``tbopt optimize CKPT --recipe DIR/search.json`` or ``--from DIR``): the recipes an
earlier search chose, rebuilt on another checkpoint of the same architecture and scored against
this checkpoint's budget. A target whose replayed file keeps the budget is done (a few known files
made, no search); the others -- the replayed recipe missed, its float model missed, or the earlier
search chose nothing there -- are searched as ``tbopt optimize`` searches, for those targets only.

A recipe is read from the keys ``search.json`` records for it (:meth:`.Recipe.from_dict`), never from
its command strings. A file that is not a ``tbopt optimize`` result, that is malformed, or whose
recorded architecture (network, widths, image size, weight shapes) is not the checkpoint's is refused
before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.checkpoint import LoadedModel
from ..core.errors import TbOptError, UsageError
from .optimize_config import REPORT_FILES, TARGETS, Recipe
from .optimize_search import Search


def architecture(loaded: LoadedModel) -> dict[str, Any]:
    """What a recipe depends on in the checkpoint: the network and its widths, the image size, and a
    digest of every weight's name and shape (a pruned or other network differs there)."""
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(loaded.module.state_dict().items()))
    arch = loaded.artifact.arch if loaded.artifact is not None else None
    return {"network": arch.describe() if arch else type(loaded.module).__name__,
            "arch": arch.to_dict() if arch else None, "size": loaded.preprocessing.size,
            "shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest()}


@dataclass
class Replay:
    """The chosen recipes of an earlier search, per target (None: it chose nothing there)."""

    source: Path
    architecture: dict[str, Any]
    recipes: dict[str, Recipe | None]
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # what replay did, per target

    def to_dict(self) -> dict[str, Any]:
        return {"from": str(self.source), "targets": self.targets}

    def settle(self, chosen: dict[str, dict[str, Any]]) -> None:
        """A replayed file that kept the budget when scored during the search but not when run as a file
        (``tbopt bench``'s way) was not chosen: say so rather than "replayed"."""
        for target, told in self.targets.items():
            if told["status"] == "replayed" and chosen.get(target, {}).get("file") is None:
                told.update(status="missed", reason=f"the replayed file missed the budget when run as a file "
                                                    f"({chosen.get(target, {}).get('reason', 'not chosen')})")


def replay_source(recipe: Path | None, from_dir: Path | None) -> Path | None:
    """The ``search.json`` that ``--recipe FILE`` or ``--from DIR`` names (one of them, or neither)."""
    if recipe is not None and from_dir is not None:
        raise UsageError("--recipe names a search.json and --from the folder that holds one: pass one of them")
    if from_dir is not None:
        if not Path(from_dir).is_dir():
            raise UsageError(f"--from {from_dir} is not a folder (the --output of an earlier tbopt optimize)")
        return Path(from_dir) / REPORT_FILES["json"]
    return None if recipe is None else Path(recipe)


def read_replay(path: Path) -> Replay:
    """The recipes in ``path``; one ``UsageError`` line when it is missing, not JSON, not tbopt
    optimize's, or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (give the search.json of an earlier tbopt optimize)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable JSON file: {str(exc).splitlines()[0]}") from None
    if not (isinstance(data, dict) and "tbopt_version" in data and isinstance(data.get("chosen"), dict)
            and str(data.get("command", "")).startswith("tbopt optimize")):
        raise UsageError(f"{path} is not the search.json of a tbopt optimize run")
    arch = data.get("architecture")
    if not (isinstance(arch, dict) and isinstance(arch.get("shapes_sha256"), str)):
        raise UsageError(f"{path} records no architecture (written by an older tbopt): run that search again "
                         f"with this version to replay it")
    recipes: dict[str, Recipe | None] = {}
    for target, chosen in data["chosen"].items():
        if target not in TARGETS or not isinstance(chosen, dict):
            raise UsageError(f"{path} is malformed: its chosen files name an unknown target {target!r}")
        if chosen.get("file") is None:
            recipes[target] = None
            continue
        try:
            recipes[target] = Recipe.from_dict(chosen["recipe"])
            if recipes[target].target != target or recipes[target].key != chosen["recipe"].get("key"):
                raise ValueError(f"its recipe is not the {target} one it records")
        except (KeyError, TypeError, ValueError, TbOptError) as exc:
            raise UsageError(f"{path} is malformed: the recipe of {target} cannot be read ({exc})") from None
    return Replay(Path(path), arch, recipes)


def check_architecture(replay: Replay, loaded: LoadedModel) -> None:
    """Refuse a recipe file made on another architecture (network, widths, image size or weight shapes)."""
    mine = architecture(loaded)
    theirs = replay.architecture
    if any(theirs.get(k) != mine[k] for k in ("arch", "size", "shapes_sha256")):
        raise UsageError(f"{replay.source} was made on another architecture ({theirs.get('network')}, "
                         f"{theirs.get('size')} px) than {loaded.path.name} ({mine['network']}, {mine['size']} px): "
                         f"its recipes replay only on a checkpoint of the same one")


def replay(search: Search, plan: Replay) -> list[str]:
    """Make and score each target's recorded recipe on this checkpoint; fill ``plan.targets`` and
    return the targets to search (the replayed file missed, or there was none to replay)."""
    to_search = []
    line = search.budget.line_db
    for target in search.cfg.targets:
        recipe = plan.recipes.get(target)
        if recipe is None:
            why = ("the earlier search chose no file for it" if target in plan.recipes
                   else "the earlier search had no such target")
            plan.targets[target] = {"status": "searched", "reason": why}
            to_search.append(target)
            continue
        cand = search.candidate(recipe)
        entry = {"recipe": recipe.key, "status": "replayed"}
        if cand is not None and cand.kept:
            plan.targets[target] = {**entry, "size_bytes": cand.size_bytes, "quality_db": cand.quality_db}
            continue
        to_search.append(target)
        plan.targets[target] = {**entry, "status": "searched", "reason": _why_missed(search, recipe, cand, line)}
        if cand is not None:
            plan.targets[target].update(size_bytes=cand.size_bytes, quality_db=cand.quality_db)
    return to_search


def _why_missed(search: Search, recipe: Recipe, cand: Any, line: float) -> str:
    if cand is not None and cand.quality_db is not None:
        return f"the replayed recipe missed the budget by {line - cand.quality_db:.2f} dB ({cand.quality_db:.2f} dB)"
    known = search.maker.known_model(recipe.model_key)
    if known is not None and known[1].quality_db is not None and not known[1].kept:
        return (f"its float model {recipe.model_key} missed the budget by {line - known[1].quality_db:.2f} dB "
                f"({known[1].quality_db:.2f} dB)")
    if any(n["key"] in (recipe.key, recipe.model_key) for n in search.not_tried):
        return "the replayed recipe did not fit the time budget"
    return "the replayed recipe could not be made here"


def replayed_models(search: Search, plan: Replay) -> list[Recipe]:
    """The pruned float models replay made that keep this checkpoint's budget (their storage recipe
    left out), the highest rate first: the targets still to search try them before anything else."""
    models: dict[str, Recipe] = {}
    for recipe in plan.recipes.values():
        if recipe is None or not (recipe.rate or recipe.sparsity):
            continue
        model = Recipe(target=recipe.target, rate=recipe.rate, steps=recipe.steps, sparsity=recipe.sparsity,
                       full_res_rate=recipe.full_res_rate, full_res=recipe.full_res, from_steps=recipe.from_steps)
        known = search.maker.known_model(model.model_key)
        if known is not None and known[1].kept:
            models.setdefault(model.model_key, model)
    return sorted(models.values(), key=lambda m: -m.rate)


def replay_then_search(search: Search, plan: Replay) -> None:
    """Replay, then the normal search for the targets replay did not settle (those only), starting
    with the storage of the pruned models replay made and kept (:func:`replayed_models`)."""
    to_search = replay(search, plan)
    if not to_search:
        search.stopped = (f"every target was replayed from {plan.source} within the budget: nothing searched")
        return
    full = search.cfg
    search.cfg = dataclasses.replace(full, targets=tuple(to_search))
    try:
        for model in replayed_models(search, plan):  # made already: their storage first, for these targets
            for target in to_search:
                search.storage_branch(model, target)
        search.run()
    finally:
        search.cfg = full
    search.stopped = f"searched {', '.join(to_search)} only (the others were replayed); " + search.stopped

