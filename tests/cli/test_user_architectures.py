"""A user's own network (``--arch``) through every command: the corpus of tests/archs.py (a ConvTranspose +
BatchNorm U-Net, GroupNorm + PixelShuffle, depthwise-separable convs, a sigmoid head, an odd one) x
info, prune (magnitude; channel with a short fine-tune), quantize, export (.mlmodel / .mlpackage, fp16 /
pal4), bench, compare, apply, run and a small optimize.

Every case ends in exit 0 with files that ``tbopt info`` opens, or in a one-line refusal where refusing
is the right answer; never an internal error. One case per architecture and command runs by default,
the other combinations are marked slow.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from ..archs import ARCHS, make
from ..helpers import assert_one_line_error
from ..helpers import run as run_cli
NAMES = list(ARCHS)


def run(*args):
    r = run_cli(*args)
    assert "internal error" not in r.output + r.stderr, r.stderr
    assert "Traceback" not in r.output + r.stderr, r.stderr
    return r


def ok(r):
    assert r.exit_code == 0, (r.exit_code, r.stderr[-2000:])
    return json.loads(r.stdout) if r.stdout.lstrip().startswith("{") else r


def arch(name: str) -> list[str]:
    return ["--arch", f"tests.archs:{ARCHS[name].__name__}"]


def slow_unless(default: bool):
    return () if default else (pytest.mark.slow,)


def opens(path) -> dict:
    """``tbopt info`` of a written file (artifacts and Core ML files need no --arch: they remember it)."""
    d = ok(run("info", path, "--json"))
    assert d["parameters"] > 0 if "parameters" in d else True
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Each network's state dict (what a user saves: no tbopt metadata) and three small photos."""
    root = tmp_path_factory.mktemp("user_archs")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    for name in NAMES:
        torch.save(make(name).state_dict(), root / f"{name}.pt")
    return root


@pytest.fixture(scope="module")
def exported(corpus):
    """The fp16 .mlpackage of each network at its own size (what bench, compare and apply read), made once."""
    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            out = corpus / f"{name}.mlpackage"
            made[name] = (ok(run("export", corpus / f"{name}.pt", *arch(name), "--fp16", "-o", out, "--json")), out)
        return made[name]

    return get


def _images(corpus) -> list[str]:
    return ["--data", corpus / "photos", "--limit", "1"]


# ---------------------------------------------------------------- info


@pytest.mark.parametrize("name", NAMES)
def test_info(corpus, name):
    d = ok(run("info", corpus / f"{name}.pt", *arch(name), "--json"))
    assert d["parameters"] == sum(p.numel() for p in make(name).parameters())


# ---------------------------------------------------------------- prune


@pytest.mark.parametrize("name", NAMES)
def test_prune_magnitude(corpus, name, tmp_path):
    out = tmp_path / "m.pt"
    d = ok(run("prune", corpus / f"{name}.pt", *arch(name), "--rate", "0.3", *_images(corpus), "-o", out, "--json"))
    pruned = [layer for layer in d["layers"] if not layer["excluded"]]
    assert pruned and all(abs(layer["sparsity"] - 0.3) < 0.05 for layer in pruned)
    assert math.isfinite(d["quality"]["fidelity_psnr_db"])
    assert opens(out)["parameters"] == d["before"]["parameters"]


# The groups each network can cut: all of them but the one that reaches the output; ShuffleNet's stem
# channels meet PixelShuffle's channel blocks in a residual add, which torch-pruning cannot cut.
@pytest.mark.parametrize("name", NAMES)
def test_prune_channel_with_fine_tune(corpus, name, tmp_path):
    out = tmp_path / "c.pt"
    d = ok(run("prune", corpus / f"{name}.pt", *arch(name), "--rate", "0.3", "--method", "channel",
               "--finetune-steps", "2", "--calib", corpus / "photos", *_images(corpus), "-o", out, "--json"))
    cut = [g for g in d["groups"] if "left_whole" not in g]
    assert cut and all(g["channels_after"] < g["channels_before"] for g in cut)
    assert d["after"]["parameters"] < d["before"]["parameters"]
    assert math.isfinite(d["quality"]["fidelity_psnr_db"])
    left = [g for g in d["groups"] if "left_whole" in g]
    assert bool(left) == (name == "shuffle")
    if left:
        assert any("left whole" in n and "up.0" in n for n in d["notes"])
    for g in d["groups"]:  # GroupNorm keeps equal groups: a cut of every group's same positions
        if name == "shuffle" and "left_whole" not in g:
            assert g["channels_after"] % 4 == 0
    info = opens(out)  # the artifact remembers --arch and rebuilds the narrower layers (depthwise groups too)
    assert info["parameters"] == d["after"]["parameters"]


# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("name", NAMES)
def test_quantize(corpus, name, tmp_path):
    out = tmp_path / "q.pt"
    d = ok(run("quantize", corpus / f"{name}.pt", *arch(name), "--calib", corpus / "photos", "--calib-count", "2",
               "--backend", "x86", "--keep-float", "none", "--threads", "1", *_images(corpus), "-o", out, "--json"))
    assert d["quality"]["fidelity_psnr_db"] > 30
    assert all(layer["quantized"] for layer in d["layers"])
    assert opens(out)


@pytest.mark.parametrize("backend", ["onednn", "qnnpack", "fbgemm"])
def test_quantize_transposed_conv_per_tensor_where_the_engine_scales_per_channel(corpus, tmp_path, backend):
    """onednn's default asks per-channel weights of every conv; torch.ao has none for ConvTranspose2d."""
    if backend not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{backend} is not in this PyTorch build")
    out = tmp_path / "q.pt"
    d = ok(run("quantize", corpus / "unet.pt", *arch("unet"), "--calib", corpus / "photos", "--calib-count", "2",
               "--backend", backend, "--keep-float", "none", "--threads", "1", *_images(corpus), "-o", out,
               "--json"))
    assert {layer["name"]: layer["quantized"] for layer in d["layers"]}["up"] is True
    per_tensor_note = any(n.startswith("up: one int8 weight scale per tensor") for n in d["notes"])
    assert per_tensor_note == (backend == "onednn")
    assert d["quality"]["fidelity_psnr_db"] > 30
    assert opens(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quantize_auto(corpus, name, tmp_path):
    out = tmp_path / "q.pt"
    d = ok(run("quantize", corpus / f"{name}.pt", *arch(name), "--calib", corpus / "photos", "--calib-count", "4",
               *_images(corpus), "-o", out, "--json"))
    assert d["quality"]["fidelity_psnr_db"] > 30
    assert opens(out)


# ---------------------------------------------------------------- export

#: Networks whose ops a NeuralNetwork (.mlmodel) holds only from iOS14 on (coremltools' check names them).
NEEDS_IOS14 = {"shuffle": "Pixel Shuffle", "odd": "Upsample"}
EXPORTS = [(n, suffix, weights) for n in NAMES for suffix in ("mlpackage", "mlmodel") for weights in ("fp16", "pal4")]


@pytest.mark.parametrize("name,suffix,weights", [
    pytest.param(n, s, w, marks=slow_unless((s, w) == ("mlmodel", "pal4"))) for n, s, w in EXPORTS])
def test_export(corpus, name, suffix, weights, tmp_path):
    out = tmp_path / f"m.{suffix}"
    d = ok(run("export", corpus / f"{name}.pt", *arch(name), "--weights", weights, "--size", "32", "-o", out,
               "--json"))
    v = d["validation"]
    assert math.isfinite(v["fidelity_psnr_db"]) and v["fidelity_psnr_db"] > (60 if weights == "fp16" else 30)
    wanted = "iOS14" if suffix == "mlmodel" and name in NEEDS_IOS14 else d["target"]
    assert d["target"] == wanted
    if wanted == "iOS14" and suffix == "mlmodel":
        assert any(NEEDS_IOS14[name] in n for n in d["notes"])
    if name == "shuffle":  # the converter folds the 0.1 scale into the head conv: the file itself is run
        assert "reference executor" in v["numerical_check"] and "head.weight" in v["rewritten_by_converter"]
    info = opens(out)
    assert info


@pytest.mark.parametrize("name", sorted(NEEDS_IOS14))
def test_export_target_too_low_for_the_networks_ops_is_one_line(corpus, name, tmp_path):
    out = tmp_path / "m.mlmodel"
    r = run("export", corpus / f"{name}.pt", *arch(name), "--size", "32", "--target", "ios13", "-o", out)
    assert_one_line_error(r, "need iOS14 or later", code=2)
    assert "--target iOS14" in r.stderr and not out.exists()


def test_export_fidelity_is_the_files_own(corpus, exported):
    """The converter folds ShuffleNet's 0.1 scale into the head conv: a PyTorch twin carrying the file's
    weights scored 34 dB, the file itself keeps its quality in export's validation and in bench (whose
    image output is rounded to 8 bits, as Core ML's is: about 60 dB at most)."""
    d, path = exported("shuffle")
    assert d["validation"]["fidelity_psnr_db"] > 80  # fp16 weights, fp32 reference executor
    b = ok(run("bench", corpus / "shuffle.pt", path, *arch("shuffle"), "--no-timing", "--json"))
    assert b["rows"][1]["fidelity_psnr_db"] > 50


# ---------------------------------------------------------------- bench, compare, apply


@pytest.mark.parametrize("name", NAMES)
def test_bench(corpus, exported, name):
    _, path = exported(name)
    d = ok(run("bench", corpus / f"{name}.pt", path, *arch(name), *_images(corpus), "--no-timing", "--json"))
    fid = d["rows"][1]["fidelity_psnr_db"]
    assert fid is not None and math.isfinite(fid) and fid > 50  # fp16 weights, fp32 reference executor


@pytest.mark.parametrize("name", NAMES)
def test_compare(corpus, exported, name, tmp_path):
    _, path = exported(name)
    d = ok(run("compare", corpus / f"{name}.pt", path, *arch(name), *_images(corpus), "--no-timing",
               "-o", tmp_path / "cmp", "--json"))
    text = json.dumps(d)
    assert "NaN" not in text and "Infinity" not in text
    assert any(p.suffix == ".png" for p in (tmp_path / "cmp").iterdir())


@pytest.mark.parametrize("name", NAMES)
def test_apply(corpus, exported, name, tmp_path):
    _, path = exported(name)
    photo = corpus / "photos" / "p0.png"
    ok(run("apply", corpus / f"{name}.pt", photo, *arch(name), "-o", tmp_path / "a", "--json"))
    ok(run("apply", path, photo, "-o", tmp_path / "b", "--json"))
    for folder in ("a", "b"):
        made = Image.open(tmp_path / folder / "p0.png")
        assert made.size == (32, 32)


# ---------------------------------------------------------------- run and optimize


@pytest.mark.parametrize("name", [pytest.param(n, marks=slow_unless(n == "unet")) for n in NAMES])
def test_run(corpus, name, tmp_path):
    out = tmp_path / "run"
    d = ok(run("run", corpus / f"{name}.pt", *arch(name), "-o", out, "--method", "channel", "--finetune-steps", "2",
               "--calib", corpus / "photos", "--calib-count", "2", *_images(corpus), "--runs", "2",
               "--threads", "1", "--backend", "x86", "--json"))
    assert "--arch tests.archs:" in d["command"]
    for name_ in ("tinybeauty_pruned.pt", "tinybeauty_optimized.pt", "TinyBeauty.mlmodel", "TinyBeauty.mlpackage"):
        assert opens(out / name_)


@pytest.mark.parametrize("name", NAMES)
def test_optimize_small(corpus, name, tmp_path):
    out = tmp_path / "opt"
    d = ok(run("optimize", corpus / f"{name}.pt", *arch(name), "-o", out, "--time-budget", "1", "--for", "ios16",
               "--rates", "", "--full-res-rates", "", "--sparsities", "", "--palettes", "pal8", "--fit-steps", "0",
               "--no-bits-by-layer", *_images(corpus), "--calib", corpus / "photos", "--runs", "2", "--threads", "1",
               "--json"))
    chosen = d["chosen"]["ios16"]
    assert chosen.get("file"), chosen
    assert any("--arch tests.archs:" in c for c in chosen["commands"])
    assert opens(chosen["file"])
