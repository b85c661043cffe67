"""tbopt quantize through the CLI: table, JSON, and every refusal as one line with nothing written."""

import json
import subprocess
import sys

import pytest


from tests.helpers import QUANTIZE_FAST, assert_one_line_error, run, save_photo, save_small, save_small_and_int8

FAST = list(QUANTIZE_FAST)


@pytest.fixture(scope="module")
def cli_quantized(tmp_path_factory):
    return save_small_and_int8(tmp_path_factory.mktemp("cli"))


def test_quantize_json(cli_quantized):
    src, out, d = cli_quantized
    assert out.is_file() and d["output"] == str(out) and d["input"] == str(src)
    for key in ("backend", "layers", "quantized_layers", "float_layers", "size", "quality", "latency", "calibration",
                "rewrites", "timings", "backends", "config"):
        assert key in d, key
    assert d["latency"]["threads"] == 1 and d["quality"]["images"].startswith("built-in synthetic test set (3 pairs")
    assert d["config"]["calib_count"] == 3 and d["config"]["keep_float"] == "auto"
    assert d["size"]["int8_bytes"] == out.stat().st_size
    # both latencies: as tbopt times it (freed memory kept) and as a plain process gets it
    assert d["latency"]["int8_plain_process_ms"] > 0 and "keeping freed memory" in d["latency"]["int8_timed_with"]
    assert "MALLOC_TRIM_THRESHOLD_=" in d["latency"]["faster_with"]


def test_info_and_apply_accept_the_int8_file(cli_quantized, tmp_path):
    _, out, _ = cli_quantized
    r = run("info", out, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "int8" and info["engine"].startswith("PyTorch int8 x86")
    assert [h["step"] for h in info["history"]] == ["test-fixture", "quantize"]
    table = run("info", out)
    assert table.exit_code == 0 and "int8" in table.stdout and "quantize" in table.stdout
    photo = save_photo(tmp_path / "p.png")
    r = run("apply", out, photo, "-o", tmp_path / "made", "--json")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "made" / "p.png").is_file()


def test_no_deprecation_chatter_on_stderr(cli_quantized, tmp_path):
    """torch prints its 'quantized tensors are deprecated' warning from C++, past Python's warning filters."""
    _, out, _ = cli_quantized
    photo = save_photo(tmp_path / "p.png")
    res = subprocess.run([sys.executable, "-m", "tinybeauty_cli", "apply", str(out), str(photo), "-o",
                          str(tmp_path / "made"), "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""


def test_quantize_table_with_the_default_output_name(tmp_path, monkeypatch):
    src = save_small(tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    r = run("quantize", src, "--keep-float", "out", *FAST)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "model_int8.pt").is_file()
    for text in ("size on disk", "fidelity vs float", "latency p50", "PSNR vs targets", "out.conv", "float",
                 "kept float (--keep-float)", "backend"):
        assert text in r.stdout, text
    # refuses to overwrite without --force
    again = run("quantize", src, *FAST)
    assert_one_line_error(again, "already exists")


def test_refusals_write_nothing(tmp_path, cli_quantized):
    _, int8, _ = cli_quantized
    src = save_small(tmp_path / "s.pt")
    out = tmp_path / "q.pt"
    assert_one_line_error(run("quantize", src, "-o", out, "--calib-count", "0"), "--calib-count", code=2)
    assert_one_line_error(run("quantize", src, "-o", out, "--keep-float", "nope", *FAST),
                          "no quantizable layer named 'nope'", code=2)
    assert_one_line_error(run("quantize", int8, "-o", out, *FAST), "already an int8 model")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert_one_line_error(run("quantize", src, "-o", out, "--calib", empty, *FAST), "no readable images")
    assert_one_line_error(run("quantize", src, "-o", out, "--backend", "gpu"), "--backend", code=2)
    assert_one_line_error(run("quantize", src, "-o", out, "--min-psnr", "0"), "--min-fidelity", code=2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "s.pt"]


@pytest.mark.slow  # 10-50 s: the default run keeps under 10 minutes on 2 cores
def test_quantize_scores_photos_without_targets(tmp_path):
    """--data of plain photos (no target/ folder): fidelity only, no PSNR against targets, no crash."""
    import numpy as np
    from PIL import Image

    from tests.helpers import ARTIFACT_SIZE as SIZE

    src = save_small(tmp_path / "model.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    r = run("quantize", src, "-o", tmp_path / "q.pt", "--data", photos, "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    q = json.loads(r.stdout)["quality"]
    assert q["target_psnr_drop_db"] is None and q["int8_target_psnr_db"] is None and q["fidelity_psnr_db"] > 0
    table = run("quantize", src, "-o", tmp_path / "q2.pt", "--data", photos, *FAST)
    assert table.exit_code == 0, table.stderr
    assert "no targets" in table.stdout
