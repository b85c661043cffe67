"""tbopt optimize --recipe / --from: an earlier search's chosen recipes rebuilt on another checkpoint of
the same architecture, scored against its own budget; only the targets where a replay misses are searched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_config import REPORT_FILES, OptimizeConfig
from tinybeauty_cli.flow.optimize_replay import replay_source
from tinybeauty_cli.core.errors import UsageError
from tinybeauty_cli.core.images import builtin_test_set
from PIL import Image

from tests.helpers import run, save_small, small_tinybeauty

SIZE = 32
#: The space the earlier search and the replays share: one channel rate with a short distillation,
#: three palettes, int8 for the CPU.
SPACE = dict(targets=("ios16", "cpu"), rates=(0.3,), lower_rates=(), finetune_steps=(4,), full_res_rates=(),
             palettes=("pal8", "pal4", "pal2"), sparsities=(), fit_steps=0, bits_by_layer=False, gptq=False,
             calib_count=3, backend="x86", runs=2, warmup=0, threads=1)
CLI_SPACE = ["--rates", "0.3", "--lower-rates", "", "--finetune-steps", "4", "--full-res-rates", "",
             "--palettes", "pal8,pal4,pal2", "--sparsities", "", "--fit-steps", "0", "--no-bits-by-layer",
             "--no-gptq", "--runs", "2", "--threads", "1"]


def space(**kw) -> OptimizeConfig:
    return OptimizeConfig(**{**SPACE, **kw})


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """Two tiny TinyBeautys of the same architecture (seeds 0 and 1), one of another width, four faces,
    and the search made on the first (its --output folder)."""
    d = tmp_path_factory.mktemp("replay")
    first = save_small(d / "style_a.pt", small_tinybeauty(seed=0), size=SIZE)
    second = save_small(d / "style_b.pt", small_tinybeauty(seed=1), size=SIZE)
    other = save_small(d / "wider.pt", small_tinybeauty(seed=0, dim=12), size=SIZE)
    images = builtin_test_set(SIZE, 4)
    (d / "faces").mkdir()
    for name, a in zip(images.names, images.inputs):
        Image.fromarray(a).save(d / "faces" / f"{name}.png")
    result = optimize(first, d / "a", space(data=d / "faces", min_fidelity_db=25.0))
    assert all(c.get("file") for c in result.to_dict()["chosen"].values())
    return d, second, other


def test_replay_on_another_checkpoint_rebuilds_the_recipes_without_a_search(earlier):
    d, second, _ = earlier
    before = json.loads((d / "a" / REPORT_FILES["json"]).read_text())
    result = optimize(second, d / "b", space(data=d / "faces", min_fidelity_db=25.0),
                      recipe=d / "a" / REPORT_FILES["json"])
    data = result.to_dict()
    for target in ("ios16", "cpu"):
        recipe = before["chosen"][target]["recipe"]
        told = data["replay"]["targets"][target]
        assert told["status"] == "replayed" and told["recipe"] == recipe["key"]
        assert data["chosen"][target]["recipe"]["key"] == recipe["key"]  # the same recipe, storage included
        assert data["chosen"][target]["recipe"]["storage"] == recipe["storage"]
        assert told["size_bytes"] == data["chosen"][target]["size_bytes"]
        # nothing searched: the one candidate per target is the replayed one
        assert [c.recipe.key for c in result.candidates if c.recipe.target == target] == [recipe["key"]]
    assert "nothing searched" in data["stopped"]
    assert data["command"].endswith(f"--recipe {d / 'a' / 'search.json'}")
    assert data["architecture"] == before["architecture"]  # the same network, widths, size and shapes
    md = (d / "b" / REPORT_FILES["markdown"]).read_text()
    assert "## Replayed recipes" in md and f"ios16: replayed {before['chosen']['ios16']['recipe']['key']}" in md


def test_a_replayed_recipe_that_misses_is_searched_and_said_so(earlier):
    d, second, _ = earlier
    # a budget no palette keeps: the replayed file misses, the search tries the rest of the space
    result = optimize(second, d / "tight", space(data=d / "faces", min_fidelity_db=60.0, targets=("ios16",)),
                      recipe=d / "a" / REPORT_FILES["json"])
    told = result.to_dict()["replay"]["targets"]["ios16"]
    assert told["status"] == "searched"
    assert "missed the budget by" in told["reason"]
    missed_by = float(told["reason"].split("by ")[1].split(" dB")[0])
    assert missed_by > 0
    replayed = [c for c in result.candidates if c.recipe.key == told["recipe"]]
    assert len(replayed) <= 1 and len(result.candidates) > len(replayed)  # the search made others
    assert "searched ios16 only" in result.stopped


def test_from_dir_is_recipe_dir_search_json(earlier, tmp_path):
    d, second, other = earlier
    assert replay_source(None, d / "a") == d / "a" / "search.json"
    with pytest.raises(UsageError, match="pass one of them"):
        replay_source(d / "a" / "search.json", d / "a")
    # the same file read both ways: the same refusal of another architecture, word for word
    by_from = run("optimize", other, "--from", d / "a", "-o", tmp_path / "x", "--data", d / "faces")
    by_recipe = run("optimize", other, "--recipe", d / "a" / "search.json", "-o", tmp_path / "y",
                    "--data", d / "faces")
    assert by_from.exit_code == by_recipe.exit_code == 2
    assert by_from.stderr == by_recipe.stderr
    assert "another architecture" in by_from.stderr
    # and a replay through the command line with --from: the targets of the earlier search, replayed
    r = run("optimize", second, "--from", d / "a", "-o", tmp_path / "c", "--data", d / "faces",
            "--min-fidelity", "25", *CLI_SPACE)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    data = json.loads((tmp_path / "c" / "search.json").read_text())
    before = json.loads((d / "a" / "search.json").read_text())
    assert set(data["replay"]["targets"]) == {"ios16", "cpu"}
    assert data["chosen"]["ios16"]["recipe"]["key"] == before["chosen"]["ios16"]["recipe"]["key"]
    assert "ios16: replayed" in r.stdout


@pytest.mark.parametrize("content, says", [
    ("not json at all", "is not a readable JSON file"),
    ('{"candidates": []}', "is not the search.json of a tbopt optimize run"),
    (None, "is malformed"),
])
def test_a_bad_search_json_is_refused_in_one_line(earlier, tmp_path, content, says):
    d, second, _ = earlier
    bad = tmp_path / "search.json"
    if content is None:  # tbopt's file with a recipe that does not hold together
        data = json.loads((d / "a" / "search.json").read_text())
        data["chosen"]["ios16"]["recipe"]["weights"] = "pal7"
        content = json.dumps(data)
    bad.write_text(content)
    r = run("optimize", second, "--recipe", bad, "-o", tmp_path / "out", "--data", d / "faces")
    assert r.exit_code == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_search_json_of_another_architecture_is_refused(earlier, tmp_path):
    d, _, other = earlier
    with pytest.raises(UsageError, match="another architecture"):
        optimize(other, tmp_path / "out", space(data=d / "faces"), recipe=d / "a" / "search.json")


def test_a_continued_distillation_replays_from_its_shorter_one(earlier, tmp_path):
    """A recipe whose distillation continues a shorter one (``channel0.3x4+2``) is rebuilt the way the
    search makes it: the short distillation first, then continued."""
    d, second, _ = earlier
    data = json.loads((d / "a" / "search.json").read_text())
    recipe = {**data["chosen"]["ios16"]["recipe"], "rate": 0.3, "steps": 6, "from_steps": 4, "full_res_rate": 0.0,
              "full_res": [], "sparsity": 0.0}
    recipe["key"] = f"ios16/channel0.3x4+2/{recipe['storage']}"
    data["chosen"] = {"ios16": {**data["chosen"]["ios16"], "recipe": recipe}}
    (tmp_path / "search.json").write_text(json.dumps(data))
    result = optimize(second, tmp_path / "out", space(data=d / "faces", min_fidelity_db=25.0, targets=("ios16",)),
                      recipe=tmp_path / "search.json")
    assert [m.key for m in result.models] == ["channel0.3x4", "channel0.3x4+2"]
    told = result.to_dict()["replay"]["targets"]["ios16"]
    assert told["recipe"] == recipe["key"]
    assert told["status"] == "replayed"  # a 25 dB budget: the storage the earlier search chose keeps it
    assert result.to_dict()["chosen"]["ios16"]["recipe"]["key"] == recipe["key"]


def test_the_targets_still_to_search_try_the_pruned_models_replay_made_first():
    """A replayed CPU recipe made a pruned model that keeps the budget; the Core ML target whose replay
    missed tries that model's storage before the search starts from the model as given."""
    from types import SimpleNamespace  # noqa: PLC0415

    from tinybeauty_cli.flow.optimize_config import Recipe  # noqa: PLC0415
    from tinybeauty_cli.flow.optimize_replay import Replay, replay_then_search, replayed_models  # noqa: PLC0415

    cpu = Recipe(target="cpu", rate=0.3, steps=2000, from_steps=750, weights="int8")
    ios16 = Recipe(target="ios16", rate=0.5, steps=750, weights="pal2", gptq=True)
    kept = {"channel0.3x750+1250": True, "channel0.5x750": False}
    calls: list[str] = []
    search = SimpleNamespace(
        cfg=space(targets=("ios16", "cpu")), budget=SimpleNamespace(line_db=40.0), not_tried=[],
        maker=SimpleNamespace(known_model=lambda key: (None, SimpleNamespace(kept=kept[key], quality_db=41.0 if kept[key]
                                                                                else 30.0)) if key in kept else None),
        candidate=lambda recipe: SimpleNamespace(kept=recipe.is_cpu, size_bytes=1, quality_db=41.0 if recipe.is_cpu else 30.0),
        storage_branch=lambda model, target: calls.append(f"{target}/{model.model_key}"),
        run=lambda: calls.append("run"), stopped="")
    plan = Replay(source=Path("search.json"), architecture={}, recipes={"cpu": cpu, "ios16": ios16})
    assert [m.model_key for m in replayed_models(search, plan)] == ["channel0.3x750+1250"]  # 0.5 missed here
    replay_then_search(search, plan)
    assert plan.targets["cpu"]["status"] == "replayed" and plan.targets["ios16"]["status"] == "searched"
    assert calls == ["ios16/channel0.3x750+1250", "run"]
