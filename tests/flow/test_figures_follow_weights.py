"""Every figure a command reports describes the weights it wrote: after fine-tuning, palette fitting or any
other change of a model's weights in place, the reported figures equal ``tbopt bench`` of the written file
(within 0.01 dB), and no memo of a model's outputs or of a fit outlives the weights it was made from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tinybeauty_cli.core.artifact import Preprocessing
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.fingerprint import weights_fingerprint
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.export.config import ExportConfig
from tinybeauty_cli.flow import export as export_flow
from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_config import CACHE_DIR, OptimizeConfig
from tinybeauty_cli.measure.evaluate import Scores
from tinybeauty_cli.runtime.runners import TorchRunner

from ..helpers import save_small, small_tinybeauty

SIZE = 32
DB = 0.01
runner = CliRunner()


def cli(*args):
    from tinybeauty_cli.cli.app import app

    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output, r.stderr)
    return r


def bench_rows(*paths, ref=None, limit=3):
    """``tbopt bench --json`` of written files: its rows, in order."""
    args = ["bench", *paths, "--json", "--no-timing", "--limit", limit, "--threads", "1"]
    if ref is not None:
        args += ["--ref", ref]
    return json.loads(cli(*args).stdout)["rows"]


def bench(*paths, ref=None, limit=3):
    """``tbopt bench --json`` of written files: rows by file name."""
    return {row["name"]: row for row in bench_rows(*paths, ref=ref, limit=limit)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_small(tmp_path_factory.mktemp("figures") / "small.pt", size=SIZE)


# ---------------------------------------------------------------- the memo itself

def test_a_module_changed_in_place_is_run_again():
    """Scores keyed by the model object gave the outputs of the weights it had when first scored."""
    model = small_tinybeauty()
    images = builtin_test_set(SIZE, 2)
    scores = Scores(images)
    run = lambda: scores.outputs(model, TorchRunner(model, Preprocessing(size=SIZE)), "scoring")  # noqa: E731
    before = run()
    assert run() is before  # the same weights: not run again
    with torch.no_grad():
        model.out.conv.weight.mul_(3.0)  # what distillation does: the same object, other weights
    after = run()
    assert not np.array_equal(before, after)


def test_the_fingerprint_changes_with_any_weight_and_not_without():
    model = small_tinybeauty()
    first = weights_fingerprint(model)
    assert weights_fingerprint(model) == first
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.view(-1)[0] += 1e-6
        assert weights_fingerprint(model) != first, name
        with torch.no_grad():
            p.view(-1)[0] -= 1e-6
        first = weights_fingerprint(model)


def test_a_palette_fit_is_not_reused_for_other_weights(src, tmp_path):
    """``export_loaded(fits=...)`` (optimize shares fits between targets) keys a fit by the weights fitted:
    a model changed in place gets its own fit, and the kept fit is never the module a later export edits."""
    loaded = load_model(src)
    fits: dict = {}
    cfg = ExportConfig(format="mlprogram", weights="pal4", fit_palettes=2, fit_images=4, fit_batch_size=2)
    export_flow.export_loaded(loaded, tmp_path / "a.mlpackage", cfg, fits=fits)
    export_flow.export_loaded(loaded, tmp_path / "b.mlpackage", cfg, fits=fits)
    assert len(fits) == 1  # the same weights: one fit
    with torch.no_grad():
        next(loaded.module.parameters()).mul_(1.5)
    export_flow.export_loaded(loaded, tmp_path / "c.mlpackage", cfg, fits=fits)
    assert len(fits) == 2


# ---------------------------------------------------------------- every command that changes weights

def _close(reported, measured, what):
    assert reported is not None and measured is not None, what
    assert abs(reported - measured) <= DB, f"{what}: reported {reported}, tbopt bench {measured}"


PRUNES = [
    pytest.param(["--method", "magnitude", "--rate", "0.3", "--finetune-steps", "4"], id="magnitude-finetune"),
    pytest.param(["--method", "global", "--rate", "0.3", "--finetune-steps", "4"], id="global-finetune",
                 marks=pytest.mark.slow),
    pytest.param(["--method", "channel", "--rate", "0.3", "--finetune-steps", "4"], id="channel-finetune"),
    pytest.param(["--method", "channel", "--rate", "0.3", "--finetune-steps", "0"], id="channel-refit-only"),
]


@pytest.mark.parametrize("options", PRUNES)
def test_prune_reports_the_written_model(src, tmp_path, options):
    out = tmp_path / "p.pt"
    q = json.loads(cli("prune", src, "-o", out, *options, "--limit", 3, "--threads", 1, "--json").stdout)["quality"]
    rows = bench(out, src, ref=src)
    _close(q["target_psnr_after_db"], rows["p.pt"]["target_psnr_db"], "target_psnr_after_db")
    _close(q["fidelity_psnr_db"], rows["p.pt"]["fidelity_psnr_db"], "fidelity_psnr_db")
    _close(q["target_psnr_before_db"], rows["small.pt"]["target_psnr_db"], "target_psnr_before_db")


def test_quantize_reports_the_written_model(src, tmp_path):
    out = tmp_path / "q.pt"
    d = json.loads(cli("quantize", src, "-o", out, "--backend", "x86", "--calib-count", 3, "--limit", 3,
                       "--threads", 1, "--json").stdout)["quality"]
    rows = bench(src, out, ref=src)
    _close(d["float_target_psnr_db"], rows["small.pt"]["target_psnr_db"], "float_target_psnr_db")
    _close(d["int8_target_psnr_db"], rows["q.pt"]["target_psnr_db"], "int8_target_psnr_db")
    _close(d["fidelity_psnr_db"], rows["q.pt"]["fidelity_psnr_db"], "fidelity_psnr_db")


RUNS = [
    pytest.param(["--method", "channel", "--finetune-steps", "4"], id="channel-finetune"),
    pytest.param(["--method", "magnitude", "--finetune-steps", "4"], id="magnitude-finetune", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options", RUNS)
def test_run_reports_the_written_models(src, tmp_path, options):
    out = tmp_path / "o"
    d = json.loads(cli("run", src, "-o", out, *options, "--limit", 3, "--calib-count", 3, "--backend", "x86",
                       "--runs", 2, "--threads", 1, "--json").stdout)
    names = {"Original": src} | {s["stage"]: out / s["artifact"] for s in d["table"][1:]}
    rows = bench(*names.values(), ref=src)
    for s in d["table"]:
        row = rows[names[s["stage"]].name]
        _close(s["target_psnr_db"], row["target_psnr_db"], f"{s['stage']} target PSNR")
        if s["stage"] != "Original":
            _close(s["fidelity_psnr_db"], row["fidelity_psnr_db"], f"{s['stage']} fidelity")
    _close(d["prune"]["quality"]["target_psnr_after_db"], rows["tinybeauty_pruned.pt"]["target_psnr_db"],
           "prune target_psnr_after_db")
    _close(d["quantize"]["quality"]["int8_target_psnr_db"], rows["tinybeauty_optimized.pt"]["target_psnr_db"],
           "quantize int8_target_psnr_db")
    _close(d["quantize"]["quality"]["float_target_psnr_db"], rows["tinybeauty_pruned.pt"]["target_psnr_db"],
           "quantize float_target_psnr_db (the pruned model)")


@pytest.mark.slow
def test_optimize_with_fitted_palettes_reports_the_files_it_wrote(src, tmp_path):
    """Fitted palettes (one fit shared by two targets), pruning with distillation: each candidate's figures
    are those of its cached file, each chosen file's those of the file in --out."""
    base = dict(palettes=("pal2",), sparsities=(), bits_by_layer=False, calib_count=3, backend="x86", runs=2,
                warmup=0, threads=1, limit=3)
    # plain pal2's fidelity first: a budget 0.5 dB above it makes the search fit pal2's palettes
    plain = optimize(src, tmp_path / "plain", OptimizeConfig(targets=("ios16",), rates=(), fit_steps=0,
                                                             min_fidelity_db=1.0, **base))
    pal2 = next(c for c in plain.candidates if c.recipe.weights == "pal2").fidelity_psnr_db
    out = tmp_path / "out"
    cfg = OptimizeConfig(targets=("ios16", "ios17"), rates=(0.3,), finetune_steps=(3,), fit_steps=3,
                         min_fidelity_db=pal2 + 0.5, **base)
    result = optimize(src, out, cfg)
    assert [c for c in result.candidates if c.recipe.fit_steps], [c.recipe.key for c in result.candidates]
    assert any(m.key.startswith("channel") for m in result.models)
    files = [out / CACHE_DIR / c.file for c in result.candidates]
    for c, row in zip(result.candidates, bench_rows(*files, ref=src)):
        _close(c.fidelity_psnr_db, row["fidelity_psnr_db"], c.recipe.key)
    chosen = {t: c for t, c in result.chosen.items() if c.get("file")}
    assert chosen
    for (target, c), row in zip(chosen.items(), bench_rows(*(c["file"] for c in chosen.values()), ref=src)):
        _close(c["fidelity_psnr_db"], row["fidelity_psnr_db"], f"chosen {target}")
        assert c["size_bytes"] == row["size_bytes"]
