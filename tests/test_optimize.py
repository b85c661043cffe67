"""tbopt optimize: the search picks the best candidate of a small space, keeps the budget, resumes
without redoing finished candidates, and prints commands that rebuild the chosen files."""

from __future__ import annotations

import json
import shlex
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tinybeauty_cli.core.checkpoint import TORCHSCRIPT_META
from tinybeauty_cli.core.errors import OutputExistsError, UsageError
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.coreml.spec import graph_op_counts, load_spec
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.export.config import ExportConfig
from tinybeauty_cli.flow import optimize as flow
from tinybeauty_cli.flow.export import export_file
from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_config import CACHE_DIR, REPORT_FILES, TARGET_FILES, OptimizeConfig
from tinybeauty_cli.measure.bench import BenchConfig, bench
from tinybeauty_cli.measure.search_report import pareto_front

from .test_quantize import save_small

SIZE = 32
runner = CliRunner()


def small_space(**kw) -> OptimizeConfig:
    """ios16 only, no pruning, three palettes, no sparse or fitted storage; int8 fast."""
    base = dict(targets=("ios16",), rates=(), palettes=("pal8", "pal4", "pal2"), sparsities=(), fit_steps=0,
                calib_count=3, backend="x86", runs=2, warmup=0, threads=1)
    return OptimizeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny TinyBeauty at 32x32, four pairs (input/ + target/) and the same four inputs alone."""
    d = tmp_path_factory.mktemp("optimize")
    ckpt = save_small(d / "tiny.pt", size=SIZE)
    images = builtin_test_set(SIZE, 4)
    for sub, arrays in (("pairs/input", images.inputs), ("pairs/target", images.targets), ("faces", images.inputs)):
        (d / sub).mkdir(parents=True)
        for name, a in zip(images.names, arrays):
            Image.fromarray(a).save(d / sub / f"{name}.png")
    return d, ckpt


def measured_fidelity(tiny, modes):
    """Each storage mode exported by tbopt export and measured by tbopt bench: the truth to compare with."""
    d, ckpt = tiny
    paths = []
    for mode in modes:
        p = d / "truth" / f"{mode}.mlpackage"
        if not p.exists():
            export_file(ckpt, p, ExportConfig(format="mlprogram", weights=None if mode == "fp16" else mode,
                                              target="iOS16"))
        paths.append(p)
    res = bench(paths, BenchConfig(data=d / "faces", runs=1, warmup=0, threads=1), ref=ckpt, time_models=False)
    return {m: (r.fidelity_psnr_db, r.size_bytes) for m, r in zip(modes, res.rows)}


def test_pareto_front_keeps_what_nothing_beats():
    assert pareto_front([(1, 30), (2, 40), (3, 35), (2, 40), (0.5, 10)]) == [True, True, False, True, True]


def test_search_picks_the_known_best_candidate_of_a_small_space(tiny, tmp_path):
    truth = measured_fidelity(tiny, ["fp16", "int8", "pal8", "pal4", "pal2"])
    # a budget that pal4 keeps and pal2 misses: the best is the smallest file that keeps it
    threshold = (truth["pal4"][0] + truth["pal2"][0]) / 2
    assert truth["pal2"][0] < threshold < truth["pal4"][0]
    expected = min((m for m, (fid, _) in truth.items() if fid >= threshold), key=lambda m: truth[m][1])
    d, ckpt = tiny
    result = optimize(ckpt, tmp_path / "out", small_space(data=d / "faces", min_fidelity_db=threshold))
    chosen = result.chosen["ios16"]
    assert chosen["recipe"]["weights"] == expected
    by_mode = {c.recipe.weights: c for c in result.candidates}
    assert set(by_mode) == {"fp16", "int8", "pal8", "pal4", "pal2"}
    for mode, (fid, size) in truth.items():  # the search measured what tbopt export + tbopt bench measure
        assert by_mode[mode].fidelity_psnr_db == pytest.approx(fid, abs=0.01)
        assert by_mode[mode].kept == (fid >= threshold)
    assert (tmp_path / "out" / TARGET_FILES["ios16"]).is_dir()
    for name in REPORT_FILES.values():
        assert (tmp_path / "out" / name).exists()


def test_budget_on_targets_is_respected_and_a_missed_palette_stops_its_branch(tiny, tmp_path):
    d, ckpt = tiny
    result = optimize(ckpt, tmp_path / "out", small_space(data=d / "pairs", max_drop_db=0.0,
                                                          palettes=("pal8", "pal6", "pal4", "pal2")))
    ref = result.budget.reference_psnr_db
    assert result.budget.uses_targets and ref is not None
    for c in result.candidates:
        assert c.kept == (c.target_psnr_db >= ref - 1e-9)
    missed = [c for c in result.candidates if c.recipe.weights.startswith("pal") and not c.kept]
    if missed:  # nothing below the first palette that missed was tried
        order = ["pal8", "pal6", "pal4", "pal2"]
        first = order.index(missed[0].recipe.weights)
        tried = {c.recipe.weights for c in result.candidates}
        assert not tried & set(order[first + 1:])
        assert {s["key"].split("/")[-1] for s in result.skipped} >= set(order[first + 1:])
    chosen = result.chosen["ios16"]
    row = bench([tmp_path / "out" / TARGET_FILES["ios16"]], BenchConfig(data=d / "pairs", runs=1, warmup=0),
                ref=ckpt, time_models=False).rows[0]
    assert ref - row.target_psnr_db <= 1e-9  # measured again by tbopt bench, the budget holds
    assert chosen["target_psnr_db"] == pytest.approx(row.target_psnr_db, abs=1e-3)


def test_an_interrupted_search_resumes_without_redoing_finished_candidates(tiny, tmp_path, monkeypatch):
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(data=d / "faces", min_fidelity_db=1.0)
    seen = []

    def interrupt_after_two(row):
        seen.append(row.recipe.key)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(ckpt, out, cfg, on_row=interrupt_after_two)
    assert not (out / REPORT_FILES["json"]).exists()
    with pytest.raises(OutputExistsError):  # an earlier search is neither overwritten nor silently reused
        optimize(ckpt, out, cfg)
    with pytest.raises(UsageError):
        optimize(ckpt, out, cfg, resume=True, force=True)

    exports = []
    real_export = flow.export_loaded
    monkeypatch.setattr(flow, "export_loaded", lambda loaded, path, config, **kw: (
        exports.append(config.weight_mode), real_export(loaded, path, config, **kw))[1])
    result = optimize(ckpt, out, cfg, resume=True)
    cached = [c.recipe.key for c in result.candidates if c.cached]
    assert cached == seen
    assert len(exports) == len(result.candidates) - 2
    assert [c.recipe.weights for c in result.candidates if not c.cached] == exports
    data = json.loads((out / REPORT_FILES["json"]).read_text())
    assert [c["recipe"]["key"] for c in data["candidates"]] == [c.recipe.key for c in result.candidates]
    assert not list(out.rglob(".*.tmp"))  # no temporary leftovers, interrupt included


def test_time_budget_lists_what_was_not_tried(tiny, tmp_path):
    d, ckpt = tiny
    result = optimize(ckpt, tmp_path / "out", small_space(data=d / "faces", time_budget_min=1e-6))
    assert result.candidates == []
    assert result.not_tried and all("time budget" in n["reason"] for n in result.not_tried)
    assert result.chosen["ios16"]["file"] is None
    assert any("time budget" in n for n in result.notes)


def _rebuild(commands, dest, cwd, monkeypatch):
    """Run the printed ``tbopt`` commands in ``cwd``, the final output renamed into ``cwd``."""
    from tinybeauty_cli.cli.app import app

    monkeypatch.chdir(cwd)
    for line in commands:
        args = shlex.split(line)
        assert args[0] == "tbopt"
        if args[-2:] == ["-o", str(dest)]:
            args[-1] = dest.name
        r = runner.invoke(app, args[1:])
        assert r.exit_code == 0, (line, r.output)
    return cwd / dest.name


def _records(path):
    """Every record of an int8 TorchScript archive but its tbopt metadata (which holds times and paths)."""
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith(f"extra/{TORCHSCRIPT_META}")}


def test_printed_commands_rebuild_the_chosen_files(tiny, tmp_path, monkeypatch):
    """Channel pruning with a short distillation, then Core ML and int8: the printed chain gives the same
    weights and graph."""
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(targets=("ios13", "ios16", "cpu"), data=d / "pairs", max_drop_db=100.0, rates=(0.5,),
                      finetune_steps=(4,), palettes=("pal4",))
    result = optimize(ckpt, out, cfg)
    for target in ("ios13", "ios16"):  # with this budget the smallest file is the pruned model's
        assert result.chosen[target]["recipe"]["rate"] == 0.5, target
    for target in ("ios13", "ios16", "cpu"):
        chosen = result.chosen[target]
        dest = out / TARGET_FILES[target]
        if chosen["recipe"]["rate"]:
            assert chosen["commands"][0].startswith("tbopt prune") and "--threads 1" in chosen["commands"][0]
        folder = tmp_path / f"rebuilt-{target}"
        folder.mkdir()
        theirs = _rebuild(chosen["commands"], dest, folder, monkeypatch)
        if target == "cpu":
            assert _records(dest) == _records(theirs)
        else:
            assert graph_op_counts(load_spec(dest)) == graph_op_counts(load_spec(theirs))
            wa, wb = stored_weights(dest), stored_weights(theirs)
            assert [(w.name, w.storage) for w in wa] == [(w.name, w.storage) for w in wb]
            for x, y in zip(wa, wb):
                assert np.array_equal(x.value, y.value), x.name


def test_cli_writes_the_chosen_files_and_refuses_an_earlier_search(tiny, tmp_path):
    from tinybeauty_cli.cli.app import app

    d, ckpt = tiny
    out = tmp_path / "out"
    args = ["optimize", str(ckpt), "--out", str(out), "--for", "ios13", "--data", str(d / "faces"),
            "--rates", "", "--palettes", "pal8,pal4", "--sparsities", "", "--fit-steps", "0", "--threads", "1",
            "--min-fidelity", "20"]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["chosen"]["ios13"]["file"].endswith(TARGET_FILES["ios13"])
    assert data["quality_axis"] == "fidelity to the original"
    assert {c["recipe"]["weights"] for c in data["candidates"]} <= {"fp16", "int8", "pal8", "pal4"}
    assert (out / CACHE_DIR).is_dir() and (out / TARGET_FILES["ios13"]).is_file()
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "tbopt export" in r.stdout and "(cached)" in r.stderr
