"""tbopt optimize: the search picks the best candidate of a small space, keeps the budget, resumes
without redoing finished candidates, and prints commands that rebuild the chosen files."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import zipfile

import numpy as np
import pytest
import torch

from tinybeauty_cli.core.checkpoint import TORCHSCRIPT_META, load_model
from tinybeauty_cli.core.errors import OutputExistsError, UsageError
from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model
from tinybeauty_cli.coreml.spec import graph_op_counts, load_spec
from tinybeauty_cli.coreml.weights import stored_weights
from tinybeauty_cli.flow import optimize_make as flow
from tinybeauty_cli.flow.optimize import optimize
from tinybeauty_cli.flow.optimize_config import CACHE_DIR, REPORT_FILES, TARGET_FILES, OptimizeConfig
from tinybeauty_cli.measure.bench import BenchConfig, bench
from tinybeauty_cli.measure.search_report import pareto_front
from tinybeauty_cli.runtime.runners import runner_for

from tests.helpers import rebuild_by_commands, run, small_space

SIZE = 32


def test_pareto_front_keeps_what_nothing_beats():
    assert pareto_front([(1, 30), (2, 40), (3, 35), (2, 40), (0.5, 10)]) == [True, True, False, True, True]


def test_search_picks_the_known_best_candidate_of_a_small_space(tiny, tmp_path):
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(data=d / "faces", min_fidelity_db=1.0, palettes=("pal6", "pal4", "pal2"))
    lax = optimize(ckpt, out, cfg)  # everything keeps a 1 dB budget: from 4 bits down, every palette is made
    files = {c.recipe.weights: out / CACHE_DIR / c.file for c in lax.candidates}
    assert set(files) == {"pal4", "pal2"}
    # the truth: each file measured by tbopt bench against the original
    rows = bench(list(files.values()), BenchConfig(data=d / "faces", runs=1, warmup=0, threads=1), ref=ckpt,
                 time_models=False).rows
    truth = {mode: (row.fidelity_psnr_db, row.size_bytes) for mode, row in zip(files, rows)}
    for c in lax.candidates:
        assert c.fidelity_psnr_db == pytest.approx(truth[c.recipe.weights][0], abs=0.01)
    threshold = (truth["pal4"][0] + truth["pal2"][0]) / 2  # pal4 keeps it, pal2 does not
    assert truth["pal2"][0] < threshold < truth["pal4"][0]
    expected = min((m for m, (fid, _) in truth.items() if fid >= threshold), key=lambda m: truth[m][1])
    result = optimize(ckpt, out, dataclasses.replace(cfg, min_fidelity_db=threshold), resume=True)
    assert result.chosen["ios16"]["recipe"]["weights"] == expected
    for c in result.candidates:
        assert c.kept == (truth[c.recipe.weights][0] >= threshold)
    assert (out / TARGET_FILES["ios16"]).is_dir()
    for name in REPORT_FILES.values():
        assert (out / name).exists()


@pytest.mark.slow  # 10-50 s: the default run keeps under 10 minutes on 2 cores
def test_a_palette_that_missed_is_tried_with_bits_by_layer_and_fitted_in_the_same_bytes(tiny, tmp_path):
    """The dear phase: the first palette that missed comes back with bits chosen by layer, then fitted;
    each keeps the plain palette's bytes (within the fit's record), and it goes on down
    a palette size only while one of them keeps the quality."""
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(data=d / "faces", min_fidelity_db=1.0, palettes=("pal6", "pal4", "pal2"))
    # nothing keeps 1000 dB: pal4 misses, then pal6 and int8 above it are made too
    plain = {c.recipe.weights: c for c in optimize(ckpt, out, dataclasses.replace(cfg, min_fidelity_db=1000)).candidates}
    # a budget between pal6 and pal4: pal4 misses as stored plainly
    threshold = (plain["pal6"].fidelity_psnr_db + plain["pal4"].fidelity_psnr_db) / 2
    result = optimize(ckpt, out, dataclasses.replace(cfg, min_fidelity_db=threshold, bits_by_layer=True,
                                                     fit_steps=3), force=True)
    by_key = {c.recipe.storage: c for c in result.candidates}
    assert not by_key["pal4"].kept and "pal2" not in by_key  # the plain branch stopped at pal4
    rescued = [k for k in by_key if k.startswith("pal4+")]
    assert rescued[0] == "pal4+bits"  # bits by layer first: the same bytes, no training
    assert by_key["pal4+bits"].size_bytes <= by_key["pal4"].size_bytes
    for key in rescued:
        assert by_key[key].size_bytes <= by_key["pal4"].size_bytes + 1500, key  # the fit's history record
    if any(by_key[k].kept for k in rescued):
        assert any(k.startswith("pal2+") for k in by_key)  # one kept: down a palette size
        kept = [c for c in result.candidates if c.kept]
        assert result.chosen["ios16"]["recipe"]["key"] == min(kept, key=lambda c: c.size_bytes).recipe.key
    else:
        assert rescued == ["pal4+bits", "pal4+fit3"]
        assert not any(k.startswith("pal2") for k in by_key)


def test_budget_on_targets_is_respected_and_a_missed_palette_stops_its_branch(tiny, tmp_path):
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(data=d / "pairs", max_drop_db=100.0, palettes=("pal6", "pal4", "pal2"))
    lax = optimize(ckpt, out, cfg)
    ref = lax.budget.reference_psnr_db
    assert lax.budget.uses_targets and ref is not None
    drops = {c.recipe.weights: ref - c.target_psnr_db for c in lax.candidates}
    assert set(drops) == {"pal4", "pal2"}  # from 4 bits down
    assert drops["pal2"] > drops["pal4"]
    max_drop = (drops["pal4"] + drops["pal2"]) / 2  # pal4 keeps it, pal2 does not
    # the same search judged by a tighter budget: read back from the cache, nothing re-measured
    result = optimize(ckpt, out, dataclasses.replace(cfg, max_drop_db=max_drop), resume=True)
    assert all(c.cached for c in result.candidates)
    for c in result.candidates:
        assert c.kept == (ref - c.target_psnr_db <= max_drop + 1e-9)
    order = ["pal4", "pal2"]
    tried = [c.recipe.weights for c in result.candidates if c.recipe.weights in order]
    first_miss = next(m for m in tried if drops[m] > max_drop)
    assert tried == order[: order.index(first_miss) + 1]  # nothing below the first palette that missed
    assert {s["key"].split("/")[-1] for s in result.skipped} == set(order[order.index(first_miss) + 1:])
    kept = [c for c in result.candidates if c.kept]
    chosen = result.chosen["ios16"]
    assert chosen["recipe"]["key"] == min(kept, key=lambda c: c.size_bytes).recipe.key
    row = bench([out / TARGET_FILES["ios16"]], BenchConfig(data=d / "pairs", runs=1, warmup=0), ref=ckpt,
                time_models=False).rows[0]
    assert ref - row.target_psnr_db <= max_drop + 1e-3  # measured again by tbopt bench, the budget holds
    assert chosen["target_psnr_db"] == pytest.approx(row.target_psnr_db, abs=1e-3)


def test_an_interrupted_search_resumes_without_redoing_finished_candidates(tiny, tmp_path, monkeypatch):
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(targets=("ios13", "ios16"), data=d / "faces", min_fidelity_db=1.0,
                      palettes=("pal8", "pal4", "pal3", "pal2"))
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
    assert result.not_tried and all("time budget" in n["reason"] for n in result.not_tried)
    assert any("time budget" in n for n in result.notes) and "time budget" in result.stopped
    # nothing fit the budget, but the target still gets a file that can be shipped: 8-bit weights, or
    # fp16 when even those miss the budget
    keys = [c.recipe.key for c in result.candidates]
    assert keys in (["ios16/original/int8"], ["ios16/original/int8", "ios16/original/fp16"])
    assert result.chosen["ios16"]["recipe"]["key"] == next(c.recipe.key for c in result.candidates if c.kept)
    assert (tmp_path / "out" / "TinyBeauty-ios16.mlpackage").is_dir()


def _int8_weights_and_graph(path):
    """An int8 TorchScript archive's weights and constants (every record but code, metadata and the
    serialization id, byte for byte) and its graph: the quantized ops in the order the code runs them.
    (The code text itself is not compared: freezing folds constants such as ``mul(4, 8)`` in some
    processes and not in others.)"""
    mangle = re.compile(rb"___torch_mangle_\d+")
    with zipfile.ZipFile(path) as z:
        records = {mangle.sub(b"", n.encode()): z.read(n) for n in z.namelist()
                   if "/code/" not in n and not n.endswith((f"extra/{TORCHSCRIPT_META}", "serialization_id", "data.pkl"))}
        code = b"".join(z.read(n) for n in sorted(z.namelist()) if "/code/" in n and n.endswith(".py")).decode()
    ops = re.findall(r"ops\.quantized\.\w+|torch\.quantize_per_tensor|torch\.dequantize|torch\.\w+_norm|"
                     r"torch\.tanh|torch\.cat|torch\.relu_?", code)
    return records, ops


@pytest.mark.slow
def test_printed_commands_rebuild_the_chosen_files(tiny, tmp_path, monkeypatch):
    """Channel pruning with a short distillation, then Core ML and int8: the printed chain gives the same
    weights and graph."""
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(targets=("ios13", "ios16", "cpu"), data=d / "pairs", max_drop_db=100.0, rates=(0.5,),
                      finetune_steps=(4,), palettes=("pal4",), backend="auto")  # the engine ranked, then pinned
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
        theirs = rebuild_by_commands(chosen["commands"], dest, folder, monkeypatch)
        if target == "cpu":
            (wa, ga), (wb, gb) = _int8_weights_and_graph(dest), _int8_weights_and_graph(theirs)
            assert wa == wb and ga == gb and any(op.startswith("ops.quantized.conv") for op in ga)
            x = torch.from_numpy(uint8_to_model(builtin_test_set(SIZE, 2).inputs))
            a, b = runner_for(load_model(dest)), runner_for(load_model(theirs))
            assert np.array_equal(a.residual(x.numpy()), b.residual(x.numpy()))
        else:
            assert graph_op_counts(load_spec(dest)) == graph_op_counts(load_spec(theirs))
            wa, wb = stored_weights(dest), stored_weights(theirs)
            assert [(w.name, w.storage) for w in wa] == [(w.name, w.storage) for w in wb]
            for x, y in zip(wa, wb):
                assert np.array_equal(x.value, y.value), x.name


def test_cli_writes_the_chosen_files_and_refuses_an_earlier_search(tiny, tmp_path, monkeypatch):

    d, ckpt = tiny
    out = tmp_path / "out"
    args = ["optimize", str(ckpt), "--out", str(out), "--for", "ios13", "--data", str(d / "faces"),
            "--rates", "", "--palettes", "pal8,pal4", "--sparsities", "", "--fit-steps", "0", "--threads", "1",
            "--min-fidelity", "20"]
    r = run(*args + ["--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["chosen"]["ios13"]["file"].endswith(TARGET_FILES["ios13"])
    assert data["quality_axis"] == "fidelity to the original"
    assert {c["recipe"]["weights"] for c in data["candidates"]} <= {"fp16", "int8", "pal8", "pal4"}
    assert (out / CACHE_DIR).is_dir() and (out / TARGET_FILES["ios13"]).is_file()
    r = run(*args)
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = run(*args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "tbopt export" in r.stdout and "(cached)" in r.stderr
    # the printed command rebuilds the file: same weights, same graph
    dest = out / TARGET_FILES["ios13"]
    folder = tmp_path / "rebuilt"
    folder.mkdir()
    theirs = rebuild_by_commands(data["chosen"]["ios13"]["commands"], dest, folder, monkeypatch)
    assert graph_op_counts(load_spec(dest)) == graph_op_counts(load_spec(theirs))
    for x, y in zip(stored_weights(dest), stored_weights(theirs), strict=True):
        assert (x.name, x.storage) == (y.name, y.storage) and np.array_equal(x.value, y.value)


def test_a_distillation_expected_to_end_after_the_budget_is_not_started(tiny, tmp_path):
    """The pace of the first pruned model (seconds per distillation step) predicts the next one: a
    distillation that would run past the budget is listed as not tried instead of overrunning it."""
    d, ckpt = tiny
    cfg = small_space(data=d / "faces", min_fidelity_db=1.0, palettes=("pal4",), rates=(0.5,),
                      finetune_steps=(4, 4_000_000), time_budget_min=5.0)
    result = optimize(ckpt, tmp_path / "out", cfg)
    assert [m.key for m in result.models] == ["channel0.5x4"]
    # continued from the 4 steps; not even half the extra steps fit, so not shortened either
    assert [n["key"] for n in result.not_tried] == ["channel0.5x4+3999996"]
    assert result.seconds < 300
    assert OptimizeConfig().time_budget_min is not None and OptimizeConfig().time_budget_min <= 15


@pytest.mark.slow  # 10-50 s: the default run keeps under 10 minutes on 2 cores
def test_full_resolution_groups_pruned_harder_for_the_cpu_and_the_command_rebuilds_them(tiny, tmp_path, monkeypatch):
    """After the longest distillation of a kept rate, the same rate with the groups of the
    full-resolution convs pruned harder (cpu first); its prune command carries the group rates and
    rebuilds the same float model."""
    d, ckpt = tiny
    out = tmp_path / "out"
    cfg = small_space(targets=("ios16", "cpu"), data=d / "pairs", max_drop_db=100.0, rates=(0.25,),
                      finetune_steps=(4,), palettes=("pal4",), full_res_rates=(0.5,))
    result = optimize(ckpt, out, cfg)
    keys = [m.key for m in result.models]
    assert keys == ["channel0.25x4", "channel0.25-fullres0.5x4"]
    cpu = result.chosen["cpu"]  # both latencies: the one that chose it, and a plain process's
    assert cpu["latency_ms"] > 0 and cpu["latency_plain_process_ms"] > 0
    assert "keeping freed memory" in cpu["latency_chosen_by"] and "MALLOC_TRIM_THRESHOLD_=" in cpu["latency_note"]
    full = [c for c in result.candidates if c.recipe.full_res_rate]
    assert [c.recipe.target for c in full][:1] == ["cpu"] and {c.recipe.target for c in full} == {"cpu", "ios16"}
    recipe = full[0].recipe
    assert recipe.full_res == ("content_encoder.conv_first.conv", "upconv2.conv")
    cached = load_model(out / CACHE_DIR / result.models[1].file)
    uniform = load_model(out / CACHE_DIR / result.models[0].file)
    for layer in recipe.full_res:  # fewer channels than at the common rate
        assert cached.module.get_submodule(layer).out_channels < uniform.module.get_submodule(layer).out_channels
    assert cached.module.get_submodule("res.model.0.model.0.conv").out_channels == \
        uniform.module.get_submodule("res.model.0.model.0.conv").out_channels
    prune_line = recipe.commands(str(ckpt), "x.pt", cfg, 1)[0]
    assert "--group-rate content_encoder.conv_first.conv=0.5 --group-rate upconv2.conv=0.5" in prune_line
    rebuilt = rebuild_by_commands([prune_line], out / "nothing.pt", tmp_path, monkeypatch)
    pruned = tmp_path / shlex.split(prune_line)[-1]
    assert not rebuilt.exists() and pruned.exists()
    a, b = load_model(pruned).module.state_dict(), cached.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
