"""The commands through Typer's CliRunner: output, JSON, and every refusal as one line."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tinybeauty_cli import __version__

from tests.helpers import REAL_CKPT, REAL_FACE, assert_one_line_error, run, save_photo, small_tinybeauty

def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "info" in r.stdout and "apply" in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


def test_info_json_on_a_small_artifact(small_artifact):
    r = run("info", small_artifact, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    model = small_tinybeauty()
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    assert d["nonzero_parameters"] <= d["parameters"]
    assert d["macs"] > 0 and d["size_bytes"] == small_artifact.stat().st_size
    assert 0 < d["zipped_bytes"] < d["size_bytes"]
    assert d["history"][0]["step"] == "test-fixture"
    assert d["preprocessing"] == {"size": 256, "value_range": [-1.0, 1.0], "output": "residual"}


def test_info_table(small_artifact):
    r = run("info", small_artifact)
    assert r.exit_code == 0
    assert "parameters" in r.stdout and "MACs" in r.stdout and "test-fixture" in r.stdout


@pytest.mark.realdata
def test_info_on_the_released_checkpoint(realdata):
    d = json.loads(run("info", REAL_CKPT, "--json").stdout)
    assert d["parameters"] == 85_227
    assert d["macs"] == pytest.approx(1.48e9, rel=0.01)
    assert "released TinyBeauty format" in d["found"]


def test_apply_writes_full_resolution_images(tmp_path, small_artifact):
    photo = save_photo(tmp_path / "p.png")
    out = tmp_path / "out"
    r = run("apply", small_artifact, photo, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["images"][0]["width"] == 96 and d["images"][0]["height"] == 64
    assert Image.open(out / "p.png").size == (96, 64)
    # refuses to overwrite, then does with --force
    assert_one_line_error(run("apply", small_artifact, photo, "-o", out), "already exists")
    assert run("apply", small_artifact, photo, "-o", out, "--force").exit_code == 0
    r = run("apply", small_artifact, photo, "-o", tmp_path / "small", "--model-size")
    assert r.exit_code == 0 and Image.open(tmp_path / "small" / "p.png").size == (256, 256)


@pytest.mark.realdata
def test_apply_on_the_real_face_adds_lipstick(tmp_path, realdata):
    r = run("apply", REAL_CKPT, REAL_FACE, "-o", tmp_path, "--json")
    assert r.exit_code == 0, r.stderr
    before = np.asarray(Image.open(REAL_FACE).convert("RGB"), np.float64)
    after = np.asarray(Image.open(tmp_path / "face_01.png"), np.float64)
    assert after.shape == before.shape
    # lipstick: the lips (lower middle of the crop) turn a darker, deeper red; the cheek barely moves
    lips, cheek = (slice(720, 780), slice(420, 600)), (slice(550, 620), slice(250, 350))
    lb, la = before[lips].mean(axis=(0, 1)), after[lips].mean(axis=(0, 1))
    assert (lb - la).mean() > 25
    assert la[0] / la[1] > lb[0] / lb[1] + 0.3
    assert np.abs(after[cheek].mean(axis=(0, 1)) - before[cheek].mean(axis=(0, 1))).max() < 12
    assert json.loads(r.stdout)["images"][0]["psnr_vs_input_db"] == pytest.approx(31.5, abs=0.5)


# --- every refusal: exit code 1, one line, no traceback, no output file ---------------------------


def _bad_files(tmp_path):
    files = {}
    files["random bytes"] = tmp_path / "random.pt"
    files["random bytes"].write_bytes(os.urandom(2048))
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    full = tmp_path / "full.pt"
    torch.save(small_tinybeauty().state_dict(), full)
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(full.read_bytes()[:4000])
    files["directory"] = tmp_path / "adir"
    files["directory"].mkdir()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'RAN'}",))

    files["code-running pickle"] = tmp_path / "evil.pt"
    files["code-running pickle"].write_bytes(pickle.dumps({"state_dict": RunsCode()}))
    files["whole module"] = tmp_path / "module.pt"
    torch.save(small_tinybeauty(), files["whole module"])
    from tests.archs import TinyUNet

    files["other architecture"] = tmp_path / "unet.pt"
    torch.save(TinyUNet().state_dict(), files["other architecture"])
    return files


@pytest.mark.parametrize("case, match", [
    ("random bytes", "not a readable PyTorch checkpoint"),
    ("empty", "empty"),
    ("truncated", "truncated or corrupt"),
    ("directory", "is a directory"),
    ("code-running pickle", "arbitrary code"),
    ("whole module", "arbitrary code"),
    ("other architecture", "not TinyBeauty"),
])
@pytest.mark.parametrize("command", ["info", "apply"])
def test_bad_checkpoints_give_one_line_and_no_output(tmp_path, case, match, command):
    bad = _bad_files(tmp_path)[case]
    out = tmp_path / "out"
    photo = save_photo(tmp_path / "p.png")
    args = ["info", bad] if command == "info" else ["apply", bad, photo, "-o", out]
    assert_one_line_error(run(*args), match)
    assert not out.exists()
    assert not (tmp_path / "RAN").exists()


def test_corrupt_png_is_named_and_nothing_is_written(tmp_path, small_artifact):
    good = save_photo(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:80])
    out = tmp_path / "out"
    assert_one_line_error(run("apply", small_artifact, good, bad, "-o", out), "bad.png")
    assert not (out / "good.png").exists()


def test_usage_errors_exit_2(small_artifact):
    r = run("info", small_artifact, "--no-such-option")
    assert r.exit_code == 2


def test_debug_env_shows_the_traceback(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"")
    r = run("info", p, env={"TBOPT_DEBUG": "1"})
    assert r.exit_code != 0 and r.exception is not None
