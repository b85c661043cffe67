"""tbopt prune through Typer's CliRunner: tables, JSON, refusals; a few end-to-end runs."""

import json

import pytest
import torch
from tinybeauty_cli.core.checkpoint import load_model


from tests.archs import NoConv, TinyUNet
from tests.helpers import REALDATA, REAL_CKPT, assert_one_line_error, run


def test_magnitude_json(tmp_path, small_artifact):
    out = tmp_path / "m.pt"
    r = run("prune", small_artifact, "--rate", "0.3", "-o", out, "--limit", "2", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["method"] == "magnitude" and d["rate"] == 0.3 and d["output"] == str(out)
    for layer in d["layers"]:
        assert layer["sparsity"] == pytest.approx(0.3, abs=0.01)
        assert layer["shape_before"] == layer["shape_after"]
    assert d["after"]["parameters"] == d["before"]["parameters"]
    assert d["after"]["macs"] == d["before"]["macs"]
    assert d["ratios"]["nonzero_parameters"] == pytest.approx(0.7, abs=0.02)
    assert d["after"]["zipped_bytes"] < d["before"]["zipped_bytes"]
    assert d["quality"]["fidelity_psnr_db"] > 20 and d["quality"]["target_psnr_before_db"] is not None
    assert any("does not get faster" in n or "not faster" in n for n in d["notes"])
    assert load_model(out).history[-1].step == "prune"


def test_table_says_what_unstructured_pruning_does_not_do(tmp_path, small_artifact):
    r = run("prune", small_artifact, "--rate", "0.5", "--method", "global", "-o", tmp_path / "g.pt", "--limit", "2")
    assert r.exit_code == 0, r.stderr
    assert "size zipped" in r.stdout and "the dense file does not shrink" in r.stdout
    assert "dense kernels multiply the zeros too" in r.stdout
    assert "prunes them unevenly" in r.stdout and "upconv2.conv" in r.stdout


def test_channel_with_finetuning_on_a_folder(tmp_path, small_artifact, photos):
    out = tmp_path / "c.pt"
    r = run("prune", small_artifact, "--rate", "0.25", "--method", "channel", "--finetune-steps", "1",
            "--calib", photos, "-o", out, "--limit", "2", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["after"]["macs"] < 0.7 * d["before"]["macs"]
    assert d["finetune"]["steps"] == 1 and str(photos) in d["finetune"]["images"]
    assert d["groups"] and all(g["channels_after"] == 6 for g in d["groups"])
    info = json.loads(run("info", out, "--json").stdout)
    assert info["parameters"] == d["after"]["parameters"]
    assert "width 6" in info["architecture"]


@pytest.mark.slow  # 10-50 s: the default run keeps under 10 minutes on 2 cores
def test_group_rate_prunes_the_named_group_harder_and_the_history_rebuilds_it(tmp_path, small_artifact, photos):
    out = tmp_path / "g.pt"
    r = run("prune", small_artifact, "--rate", "0.25", "--method", "channel", "--finetune-steps", "0",
            "--group-rate", "upconv2=0.5", "--calib", photos, "-o", out, "--limit", "2", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    widths = {g["layers"][0]: g["channels_after"] for g in d["groups"]}
    assert widths.pop("upconv2.conv") == 4 and set(widths.values()) == {6}
    assert d["config"]["group_rates"] == {"upconv2": 0.5}
    assert load_model(out).history[-1].config["group_rates"] == {"upconv2": 0.5}
    text = run("prune", small_artifact, "--rate", "0.25", "--method", "channel", "--finetune-steps", "0",
               "--group-rate", "upconv2=0.5", "--calib", photos, "-o", tmp_path / "t.pt", "--limit", "2")
    assert "rate 0.25, upconv2 0.5" in text.stdout
    for bad, what in ((["--group-rate", "upconv2"], "LAYER=RATE"), (["--group-rate", "nope=0.5"], "matches no conv"),
                      (["--group-rate", "upconv2=1.5"], "in [0, 1)")):
        assert_one_line_error(run("prune", small_artifact, "--rate", "0.25", "--method", "channel", *bad,
                                  "-o", tmp_path / "bad.pt"), what, code=2)
    assert not (tmp_path / "bad.pt").exists()


def test_default_output_name_in_the_current_folder(tmp_path, small_artifact, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("prune", small_artifact, "--rate", "0.3", "--method", "global", "--limit", "1", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "small_pruned-global-30.pt").is_file()


def test_users_unet_with_convtranspose(tmp_path, photos):
    src = tmp_path / "unet.pt"
    torch.manual_seed(0)
    torch.save(TinyUNet().state_dict(), src)
    out = tmp_path / "unet_pruned.pt"
    r = run("prune", src, "--arch", "tests.archs:TinyUNet", "--rate", "0.25", "--method", "channel",
            "--finetune-steps", "1", "--calib", photos, "-o", out, "--limit", "2", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    shapes = {layer["name"]: layer["shape_after"] for layer in d["layers"]}
    assert shapes["up"] == [12, 6, 2, 2] and shapes["head"][0] == 3
    loaded = load_model(out)  # the artifact remembers --arch and rebuilds the narrower layers
    assert loaded.module.up.weight.shape == (12, 6, 2, 2)


@pytest.mark.parametrize("rate", ["1", "1.5", "-0.1", "nan"])
def test_rate_outside_0_1_exits_2_and_writes_nothing(tmp_path, small_artifact, rate):
    out = tmp_path / "x.pt"
    assert_one_line_error(run("prune", small_artifact, "--rate", rate, "-o", out), "--rate", code=2)
    assert not out.exists()


def test_refusals_are_one_line_and_write_nothing(tmp_path, small_artifact):
    out = tmp_path / "x.pt"
    assert_one_line_error(run("prune", small_artifact, "--rate", "0.3", "--exclude", "nope", "-o", out),
                          "matches no conv layer", code=2)
    noconv = tmp_path / "noconv.pt"
    torch.save(NoConv().state_dict(), noconv)
    assert_one_line_error(run("prune", noconv, "--arch", "tests.archs:NoConv", "--rate", "0.3", "-o", out),
                          "no Conv2d or ConvTranspose2d")
    assert_one_line_error(run("prune", small_artifact, "--rate", "0.3", "-o", small_artifact), "is the input")
    assert not out.exists()
    out.write_bytes(b"keep")
    assert_one_line_error(run("prune", small_artifact, "--rate", "0.3", "-o", out), "already exists")
    assert out.read_bytes() == b"keep"
    assert run("prune", small_artifact, "-o", tmp_path / "y.pt").exit_code == 2  # --rate is required


@pytest.mark.realdata
@pytest.mark.slow
def test_channel_on_the_released_checkpoint_scores_the_real_face(tmp_path, realdata):
    out = tmp_path / "real.pt"
    r = run("prune", REAL_CKPT, "--rate", "0.3", "--method", "channel", "--finetune-steps", "20",
            "--eval-data", REALDATA, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["quality"]["images"].startswith(str(REALDATA)) and "1 images" in d["quality"]["images"]
    assert d["quality"]["fidelity_psnr_db"] > 25
    assert d["ratios"]["macs"] < 0.56
