"""The search of tbopt optimize: GPTQ palettes in its space, distillation continued from the shorter one,
the rates below the first when it misses, the cost model deciding what fits the budget, why it stopped."""

from __future__ import annotations

import dataclasses
import shlex
import time
from types import SimpleNamespace

import pytest
import torch

from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.core.progress import SilentProgress
from tinybeauty_cli.core.training import FitConfig, fit
from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_config import CACHE_DIR, Budget, OptimizeConfig, Recipe
from tinybeauty_cli.flow.optimize_cost import PRIORS, CostModel
from tinybeauty_cli.flow.optimize_search import Search
from tinybeauty_cli.flow.prune import prune_loaded
from tinybeauty_cli.prune.config import PruneConfig

from tests.helpers import rebuild_by_commands, small_space

# -- distillation continued -------------------------------------------------------------------------------


def test_a_continued_fit_draws_the_batches_and_learning_rates_of_the_longer_run():
    seen: dict[str, list] = {"full": [], "continued": []}

    def batches(name):
        def batch(step, gen):
            x = torch.rand(1, 3, 4, 4, generator=gen) * 2 - 1
            seen[name].append((step, x.clone()))
            return x, x
        batch.skip = lambda step, gen: torch.rand(1, 3, 4, 4, generator=gen)
        return batch

    lrs: dict[str, list] = {"full": [], "continued": []}
    for name, start in (("full", 0), ("continued", 6)):
        model = torch.nn.Conv2d(3, 3, 1)
        opt_step = torch.optim.Adam.step

        def spy(self, *a, _name=name, **k):
            lrs[_name].append(self.param_groups[0]["lr"])
            return opt_step(self, *a, **k)

        torch.optim.Adam.step = spy
        try:
            fit(model, batches(name), FitConfig(steps=10, warmup=2, start=start))
        finally:
            torch.optim.Adam.step = opt_step
    assert [s for s, _ in seen["continued"]] == [6, 7, 8, 9]  # 6 + 4 = the longer run's 10 steps
    for (_, a), (_, b) in zip(seen["continued"], seen["full"][6:]):
        assert torch.equal(a, b)
    assert lrs["continued"] == pytest.approx(lrs["full"][6:])


def test_prune_continues_the_shorter_distillation_from_its_weights(tiny, tmp_path):
    d, ckpt = tiny
    loaded = load_model(ckpt)
    short = PruneConfig(rate=0.5, method="channel", finetune_steps=3, finetune_images=4, calibration_images=4)
    few = builtin_test_set(32, 2)
    artifact, model, report = prune_loaded(loaded, short, eval_images=few, score_before_finetune=False)
    from tinybeauty_cli.core.artifact import save_artifact
    save_artifact(artifact, tmp_path / "short.pt")
    shorter = load_model(tmp_path / "short.pt")
    marker = shorter.module.get_submodule("upconv2.conv").weight
    with torch.no_grad():
        marker.fill_(0.125)  # a learning rate of ~0 keeps what the continuation starts from
    longer = dataclasses.replace(short, finetune_steps=5, lr=1e-12)
    with pytest.raises(Exception, match="other settings"):
        prune_loaded(loaded, longer, eval_images=few, continue_from=shorter)  # another learning rate
    longer = dataclasses.replace(short, finetune_steps=5)
    _, cont, rep = prune_loaded(loaded, longer, eval_images=few, continue_from=shorter, score_before_finetune=False)
    assert rep.finetune["steps"] == 5 and rep.finetune["continued_from_step"] == 3
    assert [p.shape for p in cont.parameters()] == [p.shape for p in shorter.module.parameters()]
    w = cont.get_submodule("upconv2.conv").weight
    assert (w - 0.125).abs().max() < 0.05  # two steps from the saved weights, not from the pruned original
    with pytest.raises(Exception, match="holds 3 distillation steps"):
        prune_loaded(loaded, dataclasses.replace(short, finetune_steps=3), eval_images=few, continue_from=shorter)


def _judged(monkeypatch, misses):
    """The search with the float models and candidates whose key ``misses(key)`` names judged below
    the budget (whatever they scored): a tiny random model's losses are in no set order."""
    from tinybeauty_cli.flow import optimize_make

    made_model, made_candidate = optimize_make.Maker.make_model, optimize_make.Maker.make_candidate

    def make_model(self, recipe, *a, **k):
        model, entry = made_model(self, recipe, *a, **k)
        entry.kept = entry.kept and not misses(recipe.model_key)
        return model, entry

    def make_candidate(self, recipe, *a, **k):
        cand = made_candidate(self, recipe, *a, **k)
        cand.kept = cand.kept and not misses(recipe.key)
        return cand

    monkeypatch.setattr(optimize_make.Maker, "make_model", make_model)
    monkeypatch.setattr(optimize_make.Maker, "make_candidate", make_candidate)


@pytest.mark.slow
def test_a_missed_first_rate_is_rescued_by_lower_rates_and_a_continued_distillation(tiny, tmp_path, monkeypatch):
    """Rate 0.5 misses after the short distillation: 0.25 is tried, and 0.5's distillation is continued
    (2 + 2 steps, from the saved 2-step model); the printed commands rebuild the continued model."""
    d, ckpt = tiny
    cfg = small_space(data=d / "faces", palettes=("pal4",), rates=(0.5, 0.6), lower_rates=(0.25, 0.1),
                      finetune_steps=(2, 4), full_res_rates=(), min_fidelity_db=1.0, limit=2)
    _judged(monkeypatch, lambda key: key == "channel0.5x2")
    result = optimize(ckpt, tmp_path / "out", cfg)
    keys = [m.key for m in result.models]
    # 0.6 is not pruned (0.5 missed); 0.25 kept, so 0.1 is not needed; the long ones continue the short
    assert keys == ["channel0.5x2", "channel0.25x2", "channel0.5x2+2", "channel0.25x2+2"]
    assert [s["key"] for s in result.skipped if "channel0.6" in s["key"]]
    assert result.stopped.startswith("the space was exhausted")
    assert "Why the search stopped" in (tmp_path / "out" / "search.md").read_text()
    continued = next(m for m in result.models if m.key == "channel0.5x2+2")
    lines = Recipe(target="ios16", rate=0.5, steps=4, from_steps=2).commands(str(ckpt), "x.mlpackage", cfg, 1)
    assert "--continue-from" in lines[1] and "--finetune-steps 4" in lines[1] and "--finetune-steps 2" in lines[0]
    rebuild_by_commands(lines[:2], tmp_path / "nothing", tmp_path, monkeypatch)
    rebuilt = load_model(tmp_path / shlex.split(lines[1])[-1]).module.state_dict()
    cached = load_model(tmp_path / "out" / CACHE_DIR / continued.file).module.state_dict()
    assert rebuilt.keys() == cached.keys() and all(torch.equal(rebuilt[k], cached[k]) for k in rebuilt)


# -- GPTQ palettes ----------------------------------------------------------------------------------------


def test_gptq_palettes_follow_the_plain_palette_that_missed_in_both_formats(tiny, tmp_path, monkeypatch):
    """Plain pal4 misses: pal4 with GPTQ entries comes next (same bytes), for the .mlmodel and the
    .mlpackage; it keeps, so GPTQ goes on down and nothing dearer is tried for pal4; the chosen file's command
    carries --palette-method gptq; on a pruned model too."""
    d, ckpt = tiny
    cfg = small_space(targets=("ios13", "ios16"), data=d / "faces", min_fidelity_db=1.0, limit=2,
                      palettes=("pal4", "pal2"), gptq=True, bits_by_layer=True, fit_steps=2,
                      rates=(0.25,), finetune_steps=(1,), full_res_rates=())
    _judged(monkeypatch, lambda key: key.endswith("/pal4") or key.endswith("/pal2"))  # plain palettes miss
    result = optimize(ckpt, tmp_path / "out", cfg)
    for target in ("ios13", "ios16"):
        for model in ("original", "channel0.25x1"):
            order = [c.recipe.storage for c in result.candidates
                     if c.recipe.target == target and c.recipe.model_key == model]
            assert order[:3] == ["pal4", "pal4+gptq", "pal2+gptq"], (target, model, order)
            assert not any(o.startswith(("pal4+bits", "pal4+fit", "pal4+gptq+")) for o in order)  # GPTQ kept pal4
        sizes = {c.recipe.storage: c.size_bytes for c in result.candidates
                 if c.recipe.target == target and c.recipe.model_key == "original"}
        assert abs(sizes["pal4+gptq"] - sizes["pal4"]) < 1500  # the same tables: GPTQ's history record aside
        chosen = result.chosen[target]
        assert "gptq" in chosen["recipe"]["storage"]
        assert any("--palette-method gptq" in c for c in chosen["commands"])


# -- the cost model and the clock -------------------------------------------------------------------------


def test_the_cost_model_predicts_from_measured_units_and_priors():
    costs = CostModel()
    assert costs.estimate({"distill_step": 100}) == 0.0  # nothing measured: no estimate
    costs.observe("score", 10.0)
    assert costs.estimate({"distill_step": 100}) == pytest.approx(100 * PRIORS["distill_step"] * 10.0)  # a prior in scorings
    costs.observe("distill_step", 30.0, 100)
    costs.observe("distill_step", 50.0, 100)
    assert costs.per("distill_step") == pytest.approx(0.4)
    assert costs.estimate({"distill_step": 1250, "score": 1}) == pytest.approx(1250 * 0.4 + 10)
    assert costs.to_dict()["distill_step"] == {"seconds_per_unit": 0.4, "units": 200}


def _clock_only(budget_min: float, spent_s: float) -> Search:
    search = Search.__new__(Search)
    search.cfg = OptimizeConfig(time_budget_min=budget_min)
    search.t_start = time.perf_counter() - spent_s
    search.costs, search.not_tried = CostModel(), []
    search.costs.observe("score", 10.0)
    search.costs.observe("distill_step", 1.0, 10)  # a slow machine: 0.1 s a step
    return search


def test_a_step_expected_to_end_after_the_budget_is_not_started_but_a_cheaper_one_is():
    search = _clock_only(budget_min=5.0, spent_s=200.0)  # 100 s left, some for the end (2 Core ML + cpu)
    reserve = (2 * PRIORS["verify"] + PRIORS["timing"] + PRIORS["plain"] + PRIORS["report"]) * 10
    assert search.reserve() == pytest.approx(reserve)
    assert not search.fits("ios13/channel0.3x750+1250/pal4", {"distill_step": 1250, "score": 1})
    assert search.fits("ios13/original/pal4+gptq", {"score": 1, "gptq": 1})
    assert search.not_tried == [{"key": "ios13/channel0.3x750+1250/pal4", "expected_s": 135.0,
                                 "left_s": pytest.approx(100 - reserve, abs=0.1),
                                 "reason": "time budget: expected to end after it"}]
    faster = _clock_only(budget_min=5.0, spent_s=200.0)
    faster.costs = CostModel()
    faster.costs.observe("score", 1.0)
    faster.costs.observe("distill_step", 0.1, 10)  # ten times faster: the same step fits
    assert faster.fits("ios13/channel0.3x750+1250/pal4", {"distill_step": 1250, "score": 1})
    assert "time budget" in search.why_stopped()



def _with_maker(search: Search, **maker) -> Search:
    search.maker = SimpleNamespace(**{"known_model": lambda key: None, "candidates": [], "progress": SilentProgress(),
                                      **maker})
    search.skipped, search.predicted, search.continued = [], set(), {}
    return search


def test_a_continued_distillation_is_shortened_to_what_the_budget_holds_and_no_further():
    """The time left after the search's end and the new model's least storage (each Core ML target's
    middle palette with GPTQ, the CPU's int8 file) holds the extra steps: all of them, a multiple of 50
    when at least half fit, else the whole continuation is left to the budget check (not started)."""
    def planned(spent_s: float) -> Recipe:
        search = _with_maker(_clock_only(budget_min=10.0, spent_s=spent_s))
        return search.continued_recipe(["ios13", "ios16", "cpu"], 0.3, 750, 2000)

    after = (2 * PRIORS["verify"] + PRIORS["timing"] + PRIORS["plain"] + PRIORS["report"] + PRIORS["export:neuralnetwork"] + PRIORS["export:mlprogram"]
             + PRIORS["gptq"] + PRIORS["quantize"] + 3 + 1) * 10  # the end, the least storage, the model's scoring
    assert planned(200.0).steps == 2000  # 400 s left: all 1250 extra steps (0.1 s each) fit
    spent = 600 - after - 100  # 1000 extra steps fit, not 1250
    shortened = planned(spent)
    assert shortened.from_steps == 750 and 750 + 950 <= shortened.steps < 2000 and shortened.steps % 50 == 0
    assert shortened.model_key == f"channel0.3x750+{shortened.steps - 750}"
    assert planned(600 - after - 30).steps == 2000  # 300 steps: under half of them, not worth shortening


def test_a_storage_that_cost_the_model_as_given_more_than_twice_a_models_margin_is_not_made():
    budget = Budget(38.932, 0.3, 40.0)  # line 38.632
    pal4 = SimpleNamespace(recipe=Recipe(target="ios13", weights="pal4", gptq=True), quality_db=38.867)
    int8 = SimpleNamespace(recipe=Recipe(target="cpu", weights="int8"), quality_db=38.801)
    models = {"channel0.3x750": 38.633, "channel0.3x750+1250": 38.96}
    search = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0), budget=budget, candidates=[pal4, int8],
                         reference=SimpleNamespace(target_psnr_db=38.932),
                         known_model=lambda key: (None, SimpleNamespace(quality_db=models[key])) if key in models else None)
    marginal = Recipe(target="ios13", rate=0.3, steps=750, weights="pal4", gptq=True)
    assert search.predicted_miss(marginal)  # 0.065 dB on the model as given; 0.001 dB of margin here
    assert search.predicted_miss(dataclasses.replace(marginal, target="cpu", weights="int8", gptq=False))
    assert "cost the model as given 0.07 dB" in search.skipped[0]["reason"]
    assert not search.predicted_miss(Recipe(target="ios13", rate=0.3, steps=2000, from_steps=750, weights="pal4",
                                            gptq=True))  # 0.33 dB of margin
    assert not search.predicted_miss(dataclasses.replace(marginal, weights="pal6"))  # not measured as given
    assert not search.predicted_miss(Recipe(target="ios13", weights="pal4", gptq=True))  # the model as given


def test_a_step_still_running_at_the_budgets_end_is_stopped_and_listed():
    search = _with_maker(_clock_only(budget_min=0.01, spent_s=0.0))  # 0.6 s

    def distillation():
        with search.maker.progress.task("fine-tuning (distillation)", total=100) as advance:
            for _ in range(100):
                time.sleep(0.02)
                advance(1)
        return "made"

    assert search.clocked("channel0.3x750", distillation) is None
    assert search.not_tried[0]["key"] == "channel0.3x750"
    assert "stopped at the time budget's end" in search.not_tried[0]["reason"]
    roomy = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0))
    assert roomy.clocked("x", lambda: "made") == "made" and roomy.not_tried == []


def test_a_rate_that_keeps_no_middle_palette_is_continued_before_any_higher_rate(monkeypatch):
    """The first rate keeps the quality but no Core ML target keeps it in the middle palette: its
    distillation is continued at once and the higher rates are left out (they would lose more)."""
    search = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0))
    search.cfg = OptimizeConfig(rates=(0.3, 0.4), finetune_steps=(750, 2000), time_budget_min=10.0)
    made: list[str] = []
    monkeypatch.setattr(search, "model", lambda recipe: made.append(recipe.model_key) or object())
    monkeypatch.setattr(search, "storage_branch", lambda recipe, target: made.append(f"{target}/{recipe.model_key}"))
    monkeypatch.setattr(search, "kept_middle", lambda recipe, targets: recipe.from_steps > 0)
    kept = search.short_distillations(["ios13", "cpu"], (750, 2000))
    assert made == ["channel0.3x750", "ios13/channel0.3x750", "cpu/channel0.3x750",
                    "channel0.3x750+1250", "ios13/channel0.3x750+1250", "cpu/channel0.3x750+1250"]
    assert kept == [0.3] and search.skipped[0]["key"] == "*/channel0.4x750/*"
    monkeypatch.setattr(search, "full_res_branch", lambda recipe, targets: made.append(f"fullres/{recipe.model_key}"))
    assert search.longer_distillations(["ios13", "cpu"], kept, 750, 2000) == [0.3]
    assert made[-2:] == ["channel0.3x750+1250", "fullres/channel0.3x750+1250"]  # not made or stored again


def test_the_time_budget_counts_from_the_start_the_cli_gives(tiny, tmp_path):
    """``tbopt optimize`` passes the moment it started (its imports are part of the wait): a search
    whose start lies an hour back has no time left, and only the file each target must have is made."""
    d, ckpt = tiny
    result = optimize(ckpt, tmp_path / "out", small_space(data=d / "faces", min_fidelity_db=1.0, limit=2,
                                                          time_budget_min=1.0),
                      started=time.perf_counter() - 3600)
    assert result.seconds >= 3600
    assert result.not_tried and all(n["reason"] == "time budget reached before it was started" for n in result.not_tried)
    assert [c.recipe.storage for c in result.candidates] == ["int8"]  # the fallback, made past the budget


@pytest.mark.parametrize("quality, made_next", [(38.684, False), (38.85, True)])
def test_a_higher_rate_sure_to_miss_is_not_pruned_and_the_kept_one_is_continued(monkeypatch, quality, made_next):
    """0.3 kept 38.684 dB of the original's 38.932 (line 38.632): 0.4, even losing only in proportion
    to the rate (0.33 dB), would end below the line, so 0.3's distillation is continued instead. With
    38.85 dB kept, 0.4 is pruned."""
    entries = {"channel0.3x750": SimpleNamespace(quality_db=quality, kept=True)}
    search = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0), budget=Budget(38.932, 0.3, 40.0),
                         reference=SimpleNamespace(target_psnr_db=38.932),
                         known_model=lambda key: (object(), entries[key]) if key in entries else None)
    search.cfg = OptimizeConfig(rates=(0.3, 0.4), finetune_steps=(750, 2000), time_budget_min=10.0)
    made: list[str] = []
    monkeypatch.setattr(search, "model", lambda recipe: made.append(recipe.model_key) or object())
    monkeypatch.setattr(search, "storage_branch", lambda recipe, target: None)
    monkeypatch.setattr(search, "kept_middle", lambda recipe, targets: True)
    search.short_distillations(["ios13"], (750, 2000))
    if made_next:
        assert made == ["channel0.3x750", "channel0.4x750"] and not search.skipped
    else:
        assert made == ["channel0.3x750", "channel0.3x750+1250"]
        assert search.skipped[0]["key"] == "*/channel0.4x750/*" and "0.33" not in search.skipped[0]["reason"]
        assert "would end 0.03 dB below" in search.skipped[0]["reason"]


def test_longer_distillations_continue_the_highest_kept_rate_first(monkeypatch):
    """Its files are the smallest and fastest: when the budget holds one continuation, it is that one."""
    search = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0))
    continued: list[float] = []
    monkeypatch.setattr(search, "continue_rate", lambda targets, rate, shorter, steps: continued.append(rate) or False)
    search.longer_distillations(["ios13"], [0.3, 0.4, 0.5], 750, 2000)
    assert continued == [0.5, 0.4, 0.3]
    continued.clear()
    search.longer_distillations(["ios13"], [-0.3, 0.25], 750, 2000)  # 0.3 missed: rescued first
    assert continued == [0.3, 0.25]


@pytest.mark.parametrize("palettes, kept_weights, expected", [
    (("pal8", "pal6", "pal4", "pal3", "pal2"), "pal4", True),
    (("pal8", "pal6", "pal4", "pal3", "pal2"), "pal6", False),  # kept only above the middle palette
    (("pal8", "pal6"), "pal8", True),  # no pal4 given: the storage search starts from the largest
])
def test_the_palette_a_model_must_keep_is_the_one_its_storage_search_starts_from(palettes, kept_weights, expected):
    model = Recipe(target="ios13", rate=0.3, steps=750)
    cand = SimpleNamespace(kept=True, recipe=Recipe(target="ios13", rate=0.3, steps=750, weights=kept_weights, gptq=True))
    search = _with_maker(_clock_only(budget_min=10.0, spent_s=0.0), candidates=[cand])
    search.cfg = OptimizeConfig(palettes=palettes)
    assert search.kept_middle(model, ["ios13", "cpu"]) is expected
