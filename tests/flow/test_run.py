"""tbopt run: the whole chain into one folder, its table, its files, and what happens when a stage fails."""

import json
import os

import pytest
from PIL import Image

from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import InputError, UsageError
from tinybeauty_cli.core.files import atomic_output
from tinybeauty_cli.flow import pipeline
from tinybeauty_cli.flow.pipeline import StageError, run_pipeline
from tinybeauty_cli.flow.run_config import OUTPUT_FILES, RunConfig
from tinybeauty_cli.runtime.runners import open_runner

from tests.helpers import REAL_FACE, assert_one_line_error, run, save_small

# Small and quick: 3 scored images, 3 calibration images, one engine, 2 timed runs.
FAST = ["--limit", "3", "--calib-count", "3", "--backend", "x86", "--runs", "2", "--threads", "1"]
STAGE_NAMES = ["Original", "Pruned", "Quantized", "CoreML", "CoreML package"]


def fast_config(**kw) -> RunConfig:
    return RunConfig(**{**dict(limit=3, calib_count=3, backend="x86", runs=2, threads=1), **kw})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    src = save_small(d / "small.pt")
    out = d / "optimized_model"
    r = run("run", src, "--out", out, *FAST)
    assert r.exit_code == 0, r.stderr
    return src, out, r


def test_run_writes_every_file(finished):
    src, out, _ = finished
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES.values())  # no temporary leftovers
    assert load_model(out / OUTPUT_FILES["pruned"]).kind == "float"
    assert open_runner(out / OUTPUT_FILES["quantized"]).kind == "int8"
    assert (out / "TinyBeauty.mlpackage" / "Manifest.json").is_file()
    with Image.open(out / OUTPUT_FILES["figure"]) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 600


def test_results_json_holds_the_measured_table(finished):
    src, out, _ = finished
    d = json.loads((out / "results.json").read_text())
    table = d["table"]
    assert [row["stage"] for row in table] == STAGE_NAMES
    files = [src, out / "tinybeauty_pruned.pt", out / "tinybeauty_optimized.pt", out / "TinyBeauty.mlmodel"]
    for row, path in zip(table, files):  # sizes are the files' own bytes
        assert row["size_bytes"] == path.stat().st_size, row["stage"]
    for row, bench_row in zip(table, d["bench"]["rows"]):  # the table is bench's measurement, not a copy of it
        assert row["target_psnr_db"] == pytest.approx(bench_row["target_psnr_db"], abs=1e-3)
        assert row["latency_ms"] == pytest.approx(bench_row["latency_p50_ms"], abs=1e-3)
        assert row["latency_ms"] > 0
    assert table[0]["fidelity_psnr_db"] == "inf" or table[0]["fidelity_psnr_db"] == float("inf")
    assert all(20 < row["fidelity_psnr_db"] for row in table[1:])
    assert "reference executor (not device)" in table[3]["engine"]
    assert table[2]["engine"].startswith("PyTorch int8 x86")
    assert d["checks"]["mlmodel_bytes"] == (out / "TinyBeauty.mlmodel").stat().st_size
    assert set(d["checks"]["psnr_drop_db"]) == set(STAGE_NAMES[1:])
    assert d["config"]["method"] == "magnitude" and d["config"]["rate"] == 0.3
    assert d["data"].startswith("built-in synthetic test set (3 pairs")
    assert set(d["seconds"]) >= {"prune", "quantize", "export", "measure", "report", "total"}
    assert d["prune"]["rate"] == 0.3 and d["quantize"]["backend"] == "x86"
    assert set(d["export"]) == {"mlmodel", "mlpackage"}
    assert d["export"]["mlmodel"]["format"] == "neuralnetwork" and d["export"]["mlmodel"]["target"] == "iOS13"


def test_table_markdown_and_history(finished):
    src, out, r = finished
    for text in ["Size (KB)", "PSNR (dB)", "Inference time (ms)", "Engine", *STAGE_NAMES,
                 "TinyBeauty.mlmodel:", "time: prune", "not device"]:
        assert text in r.stdout, text
    md = (out / "results.md").read_text()
    assert "| Stage |" in md and "| CoreML |" in md and "not device latency" in md
    art = load_model(out / "tinybeauty_pruned.pt").artifact
    assert [h.step for h in art.history][-1] == "prune"


def test_existing_outputs_are_not_overwritten(finished):
    src, out, _ = finished
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert_one_line_error(run("run", src, "--out", out, *FAST), "already exists")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_failing_stage_is_named_and_earlier_outputs_stay(tmp_path, monkeypatch):
    src = save_small(tmp_path / "small.pt")
    out = tmp_path / "o"

    def broken_export(*args, **kwargs):
        raise InputError("the exporter broke")

    monkeypatch.setattr(pipeline, "export_loaded", broken_export)
    with pytest.raises(StageError) as err:
        run_pipeline(src, out, fast_config())
    msg = str(err.value)
    assert "stage 3/5 (export) failed: the exporter broke" in msg
    assert "tinybeauty_pruned.pt, tinybeauty_optimized.pt" in msg
    assert sorted(p.name for p in out.iterdir()) == ["tinybeauty_optimized.pt", "tinybeauty_pruned.pt"]
    # a bug (not a tbopt error) is reported with its stage too
    monkeypatch.setattr(pipeline, "open_runner", lambda *a, **k: 1 / 0)  # the measure stage opens the Core ML files
    monkeypatch.setattr(pipeline, "export_loaded", lambda *a, **k: None)
    with pytest.raises(StageError, match=r"stage 4/5 \(measure\) failed: internal error: ZeroDivisionError"):
        run_pipeline(src, out, fast_config(), force=True)


def test_each_model_runs_once_on_the_evaluation_images(tmp_path, monkeypatch):
    """The run shares its scores: original, pruned, int8 and the two Core ML files, one pass each."""
    from tinybeauty_cli.measure import evaluate as evaluate_module

    passes = []
    real = evaluate_module.evaluate

    def counted(runner, images, *args, **kwargs):
        passes.append((runner.kind, len(images)))
        return real(runner, images, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", counted)
    result = run_pipeline(save_small(tmp_path / "small.pt"), tmp_path / "o", fast_config())
    assert sorted(kind for kind, _ in passes) == ["coreml", "coreml", "float", "float", "int8"]
    assert all(n == 3 for _, n in passes)
    table = {s.stage: s for s in result.stages}
    assert table["Pruned"].target_psnr_db == pytest.approx(result.prune.quality["target_psnr_after_db"], abs=1e-3)
    assert table["Quantized"].fidelity_psnr_db is not None


def test_interrupted_stage_leaves_no_partial_file(tmp_path, monkeypatch):
    src = save_small(tmp_path / "small.pt")
    out = tmp_path / "o"
    import tinybeauty_cli.flow.quantize as quantize

    def write_then_interrupt(path, content, *, force=False):  # Ctrl-C after the bytes, before the rename
        with atomic_output(path, force=force) as tmp:
            tmp.write_bytes(content)
            assert tmp.stat().st_size > 0
            raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "write_file", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(src, out, fast_config())
    assert sorted(p.name for p in out.iterdir()) == ["tinybeauty_pruned.pt"]  # no temporary folder either


def test_bad_input_is_refused_before_anything_is_written(tmp_path, finished):
    _, done, _ = finished
    src = save_small(tmp_path / "small.pt")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(run("run", src, "--out", a_file, *FAST), "is a file, not a folder")
    assert_one_line_error(run("run", src, "--out", tmp_path / "o", "--rate", "1.5", *FAST), "--rate", code=2)
    assert_one_line_error(run("run", src, "--out", tmp_path / "o", "--data", tmp_path / "nope", *FAST),
                          "is not a folder")
    assert_one_line_error(run("run", done / "tinybeauty_optimized.pt", "--out", tmp_path / "o", *FAST),
                          "starts from a float checkpoint", code=2)
    assert_one_line_error(run("run", src, "--out", tmp_path / "o", "--weights", "pal5", *FAST), "pal5", code=2)
    assert_one_line_error(run("run", tmp_path / "missing.pt", "--out", tmp_path / "o", *FAST), "missing.pt")
    assert not (tmp_path / "o").exists()


def test_config_refuses_bad_values_up_front():
    with pytest.raises(UsageError):
        RunConfig(rate=1.0)
    with pytest.raises(Exception, match="calib-count"):
        RunConfig(calib_count=0)
    cfg = RunConfig(method="channel", data=None)
    assert cfg.command_line("a.pt", "o") == "tbopt run a.pt --output o --rate 0.3 --method channel --weights int8"


@pytest.mark.slow
@pytest.mark.realdata
def test_run_on_the_released_checkpoint_with_a_photo_folder(realdata, tmp_path):
    """The issue's case: the authors' checkpoint, a folder with face_01.png (no targets: fidelity only)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(REAL_FACE, photos / REAL_FACE.name)
    out = tmp_path / "out"
    r = run("run", realdata / "tinybeauty_style1.pt", "--out", out, "--data", photos, "--runs", "3")
    assert r.exit_code == 0, r.stderr
    d = json.loads((out / "results.json").read_text())
    assert all(row["target_psnr_db"] is None for row in d["table"])
    assert all(row["fidelity_psnr_db"] > 35 for row in d["table"][1:]), d["table"]
    assert d["checks"]["mlmodel_under_100kb"]
    assert "no targets" in r.stdout
