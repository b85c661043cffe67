"""tbopt quantize as a library: int8 TorchScript that runs alone, keep-float, backends, refusals."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.artifact import ArchSpec, Artifact, HistoryStep, Preprocessing, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import ConfigError, ImageError, InputError, UnsupportedError
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig
from tinybeauty_cli.core.progress import SilentProgress
from tinybeauty_cli.flow.quantize import calibration_images, quantize_file
from tinybeauty_cli.measure.describe import describe
from tinybeauty_cli.quantize import engines as qz
from tinybeauty_cli.quantize.config import QuantizeConfig
from tinybeauty_cli.runtime.runners import open_runner

from tests.archs import TinyUNet
from tests.helpers import ARTIFACT_SIZE as SIZE, small_tinybeauty, save_small

def fast_config(**kw) -> QuantizeConfig:
    base = dict(backend="x86", calib_count=4, runs=2, warmup=0, eval_limit=4, sensitivity_images=4, threads=1)
    base.update(kw)
    return QuantizeConfig(**base)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The small TinyBeauty quantized once; several tests read the result."""
    d = tmp_path_factory.mktemp("quantized")
    src = save_small(d / "small.pt")
    progress = SilentProgress()
    result = quantize_file(src, d / "small_int8.pt", fast_config(), progress=progress, command="test")
    return src, d / "small_int8.pt", result, progress


def test_result_figures_and_layers(quantized):
    src, out, r, _ = quantized
    d = r.to_dict()
    assert out.is_file() and d["output"] == str(out)
    assert d["backend"] == "x86" and d["backend_reason"] == "requested with --backend"
    names = [layer["name"] for layer in d["layers"]]
    assert names[0] == "content_encoder.conv_first.conv" and names[-1] == "out.conv" and len(names) == 10
    assert d["quantized_layers"] == names and d["float_layers"] == []  # the small model meets 45 dB all-int8
    q = d["quality"]
    assert q["fidelity_psnr_db"] > 45 and q["worst_fidelity_db"] <= q["fidelity_psnr_db"]
    assert abs(q["target_psnr_drop_db"] - (q["float_target_psnr_db"] - q["int8_target_psnr_db"])) < 1e-2
    lat = d["latency"]
    assert lat["threads"] == 1 and lat["batch"] == 1 and lat["size"] == SIZE
    assert lat["float"]["runs"] == 2 and lat["int8"]["p50_ms"] > 0
    assert lat["ratio"] == pytest.approx(lat["int8"]["p50_ms"] / lat["float"]["p50_ms"], rel=1e-2)
    s = d["size"]
    assert s["float_bytes"] == src.stat().st_size and s["int8_bytes"] == out.stat().st_size
    assert s["int8_zipped_bytes"] > 0
    assert d["calibration"]["images"] == 4 and "synthetic portraits" in d["calibration"]["source"]
    assert len(d["rewrites"]["applied"]) == 5  # norms, layer norm, sub-pixel, tanh, equalized ranges
    assert d["timings"]["total_s"] > 0
    json.dumps(d)  # JSON-ready


def test_artifact_runs_with_torch_alone(quantized):
    """A fresh interpreter that never imports tinybeauty_cli loads and runs the file."""
    _, out, _, _ = quantized
    code = (
        "import json, sys, torch\n"
        f"extra = {{'tbopt.json': ''}}\n"
        f"meta = json.loads(__import__('zipfile').ZipFile({str(out)!r}).read('int8/extra/tbopt.json'))\n"
        "torch.backends.quantized.engine = meta['quantized_engine']\n"
        f"m = torch.jit.load({str(out)!r}, _extra_files=extra)\n"
        f"y = m(torch.rand(3, 3, {SIZE}, {SIZE}) * 2 - 1)\n"
        "assert y.shape == (3, 3, 64, 64) and y.abs().max() < 1\n"
        "assert json.loads(extra['tbopt.json'])['quantized'] is True\n"
        "assert not any(k.startswith('tinybeauty_cli') for k in sys.modules)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_metadata_history_and_archive_layout(quantized):
    src, out, r, _ = quantized
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        meta = json.loads(zf.read("int8/extra/tbopt.json"))
    assert not any(n.endswith(".debug_pkl") for n in names)
    assert all(n.startswith("int8/") for n in names)
    assert meta["format"] == "tbopt-torchscript" and meta["format_version"] == 1
    assert meta["quantized"] is True and meta["engine"] == "PyTorch int8 x86 (TorchScript)"
    assert meta["quantized_engine"] == "x86"
    assert meta["preprocessing"]["size"] == SIZE
    assert [h["step"] for h in meta["history"]] == ["test-fixture", "quantize"]
    step = meta["history"][-1]
    assert step["command"] == "test" and step["config"]["backend"] == "x86" and step["config"]["version"] == 1
    assert step["figures"]["fidelity_psnr_db"] == r.quality["fidelity_psnr_db"]
    model = small_tinybeauty()
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["macs"] < meta["float_macs"]  # the sub-pixel convs do 4/9 of the upsampled convs' work
    assert meta["calibration"]["images"] == 4 and meta["configuration"]["calib_count"] == 4
    assert meta["source"]["path"] == str(src)
    assert len(meta["layers"]) == 10


def test_info_and_runner_accept_the_int8_file(quantized):
    _, out, r, _ = quantized
    info = describe(out)
    assert info["kind"] == "int8" and info["engine"] == "PyTorch int8 x86 (TorchScript)"
    assert info["parameters"] == sum(p.numel() for p in small_tinybeauty().parameters())
    assert info["metadata"]["quantized_engine"] == "x86" and r.backend == "x86"
    assert [h["step"] for h in info["history"]] == ["test-fixture", "quantize"]
    runner = open_runner(out)
    assert runner.kind == "int8" and runner.size == SIZE
    x = np.random.default_rng(0).uniform(-1, 1, (9, 3, SIZE, SIZE)).astype(np.float32)
    y = runner.predict_all(x)  # batches of 8 and 1: the scripted graph is not tied to a batch size
    assert y.shape == x.shape and np.all(np.abs(y) <= 1)


def test_quantize_module_is_module_in_module_out():
    from tinybeauty_cli.core.contexts import quantized_engine
    from tinybeauty_cli.core.images import synthetic_unlabeled, uint8_to_model
    from tinybeauty_cli.quantize.transform import quantize_module

    model = small_tinybeauty()
    calib = torch.from_numpy(uint8_to_model(synthetic_unlabeled(4, SIZE).inputs))
    script, outcome = quantize_module(model, fast_config(), calib)
    assert isinstance(script, torch.jit.ScriptModule) and outcome.backend == "x86"
    assert outcome.engine == "PyTorch int8 x86 (TorchScript)" and len(outcome.quantized_layers) == 10
    assert outcome.calibration_fidelity_db > 45 and outcome.sensitivity_images == 4
    with quantized_engine(outcome.backend), torch.no_grad():
        assert script(calib[:2]).shape == (2, 3, SIZE, SIZE)


def test_quantize_loaded_never_reads_the_models_path(tmp_path):
    """The pipeline's in-memory model: its path does not exist; sizes come from its bytes."""
    import io

    from tinybeauty_cli.core.checkpoint import LoadedModel
    from tinybeauty_cli.core.images import builtin_test_set
    from tinybeauty_cli.flow.quantize import quantize_loaded

    model = small_tinybeauty()
    art = Artifact.for_tinybeauty(model.config, model.state_dict(), history=[HistoryStep.now("prune")],
                                  preprocessing=Preprocessing(size=SIZE))
    buf = io.BytesIO()
    torch.save(art.to_payload(), buf)
    loaded = LoadedModel(tmp_path / "not_yet.pt", "float", "pruned in memory", "ab" * 32, artifact=art,
                         module=art.build_model())
    images = builtin_test_set(SIZE, 3)
    r = quantize_loaded(loaded, tmp_path / "q.pt", fast_config(), eval_images=images, source_bytes=buf.getvalue())
    assert not (tmp_path / "not_yet.pt").exists() and (tmp_path / "q.pt").is_file()
    assert r.input == str(tmp_path / "not_yet.pt") and r.quality["images"] == images.source
    assert r.size["float_bytes"] == len(buf.getvalue()) and 0 < r.size["float_zipped_bytes"] < r.size["float_bytes"]
    meta = load_model(tmp_path / "q.pt").metadata
    assert meta["source"]["sha256"] == "ab" * 32 and [h["step"] for h in meta["history"]] == ["prune", "quantize"]


def test_quantizing_an_int8_file_is_refused_and_writes_nothing(quantized, tmp_path):
    _, out, _, _ = quantized
    with pytest.raises(InputError, match="already an int8 model"):
        quantize_file(out, tmp_path / "again.pt", fast_config())
    assert not (tmp_path / "again.pt").exists()


def test_keep_float_by_name_and_by_module_prefix_calibrated_on_a_folder(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", i)
    src = save_small(tmp_path / "s.pt")
    r = quantize_file(src, tmp_path / "q.pt", fast_config(keep_float="upconv2,out.conv", calib=folder))
    assert r.calibration["images"] == 3 and str(folder) in r.calibration["source"]
    assert r.float_layers == ["upconv2.conv", "out.conv"]
    kept = {layer.name: layer.reason for layer in r.layers if not layer.quantized}
    assert kept == {"upconv2.conv": "kept float (--keep-float)", "out.conv": "kept float (--keep-float)"}
    # a float layer appears as a float conv in the TorchScript graph
    code = load_model(tmp_path / "q.pt").module.code
    assert code.count("quantized.conv2d") == 8


def test_unknown_keep_float_layer_is_an_error_before_any_write(tmp_path):
    src = save_small(tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="no quantizable layer named 'upconv9'"):
        quantize_file(src, tmp_path / "q.pt", fast_config(keep_float="upconv9"))
    assert not (tmp_path / "q.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temporary files left


def test_keep_float_auto_keeps_the_most_sensitive_layers_until_the_target(tmp_path):
    src = save_small(tmp_path / "s.pt")
    r = quantize_file(src, tmp_path / "q.pt", fast_config(min_psnr_db=62.0))
    d = r.to_dict()
    assert d["float_layers"], "a 62 dB target needs some float layers on this model"
    alone = {layer["name"]: layer["alone_fidelity_db"] for layer in d["layers"]}
    assert all(v is not None for v in alone.values())  # every layer's sensitivity was measured
    # the kept layers are the least faithful ones when quantized alone, in that order
    by_sensitivity = sorted(alone, key=alone.get)
    assert d["float_layers"] == [n for n in by_sensitivity[:len(d["float_layers"])] if n in d["float_layers"]]
    assert set(d["float_layers"]) == set(by_sensitivity[:len(d["float_layers"])])
    steps = d["keep_float_steps"]
    assert steps[0]["kept_float"] == [] and steps[-1]["fidelity_db"] >= 62.0
    assert all(s["fidelity_db"] < 62.0 for s in steps[:-1])
    assert d["quality"]["calibration_fidelity_db"] >= 62.0
    for layer in d["layers"]:
        if not layer["quantized"]:
            assert layer["reason"].startswith("kept float: most sensitive #")


def test_unreachable_fidelity_target_is_an_error(tmp_path):
    torch.manual_seed(0)
    art = Artifact(ArchSpec.custom("tests.archs:TinyUNet", {"width": 4}), TinyUNet(4).state_dict(),
                   preprocessing=Preprocessing(size=32))
    save_artifact(art, tmp_path / "unet.pt")
    with pytest.raises(UnsupportedError, match="fidelity stays below --min-fidelity"):
        quantize_file(tmp_path / "unet.pt", tmp_path / "q.pt", fast_config(min_psnr_db=149.0))
    assert not (tmp_path / "q.pt").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="--calib-count must be >= 1"):
        QuantizeConfig(calib_count=0)
    with pytest.raises(ConfigError, match="--backend"):
        QuantizeConfig(backend="tpu")
    with pytest.raises(ConfigError, match="--min-fidelity"):
        QuantizeConfig(min_psnr_db=-3)
    with pytest.raises(ConfigError, match="--keep-float"):
        QuantizeConfig(keep_float="a,,b")
    assert QuantizeConfig(keep_float=" None ").keep_float == "none"
    assert QuantizeConfig(keep_float="a, b,a").keep_float == ("a", "b")
    d = QuantizeConfig(calib="x", keep_float="a,b", threads=1).to_dict()
    assert d["calib"] == "x" and d["version"] == 1 and d["keep_float"] == ["a", "b"]
    assert QuantizeConfig.from_dict(d) == QuantizeConfig(calib="x", keep_float="a,b", threads=1)
    with pytest.raises(ConfigError, match="version 9"):
        QuantizeConfig.from_dict({**d, "version": 9})


def _png(path, seed=0, size=(80, 60)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_calibration_folder_skips_unreadable_files(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    _png(folder / "a.png", 0)
    _png(folder / "b.png", 1)
    (folder / "c.jpg").write_bytes(b"not a jpeg")
    progress = SilentProgress()
    images, skipped = calibration_images(folder, 5, SIZE, progress)
    assert len(images) == 2 and images.inputs.shape == (2, SIZE, SIZE, 3) and skipped == ["c.jpg"]
    assert any("skipped 1 unreadable" in n for n in progress.notes)
    assert any("fewer than --calib-count 5" in n for n in progress.notes)
    images, _ = calibration_images(folder, 1, SIZE, progress)
    assert len(images) == 1


def test_calibration_folder_of_pairs_uses_the_inputs(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "target").mkdir()
    _png(tmp_path / "input" / "x.png")
    _png(tmp_path / "target" / "x.png", 1)
    images, _ = calibration_images(tmp_path, 4, SIZE, SilentProgress())
    assert images.names == ["x"]


@pytest.mark.parametrize("content", ["empty", "unreadable", "missing"])
def test_calibration_folder_without_readable_images_is_an_error(tmp_path, content):
    folder = tmp_path / "calib"
    if content != "missing":
        folder.mkdir()
    if content == "unreadable":
        (folder / "a.png").write_bytes(b"\x89PNG broken")
        (folder / "notes.txt").write_text("hello")
    src = save_small(tmp_path / "s.pt")
    with pytest.raises(ImageError):
        quantize_file(src, tmp_path / "q.pt", fast_config(calib=folder))
    assert not (tmp_path / "q.pt").exists()


def test_a_users_network_with_conv_transpose_and_cat(tmp_path):
    torch.manual_seed(0)
    net = TinyUNet(8).eval()
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    r = quantize_file(tmp_path / "unet.pt", tmp_path / "q.pt", fast_config(keep_float="none"),
                       arch="tests.archs:TinyUNet")
    kinds = {layer.name: layer.kind for layer in r.layers}
    assert kinds["up"] == "ConvTranspose2d" and all(layer.quantized for layer in r.layers)
    assert r.quality["fidelity_psnr_db"] > 35  # the cat of two int8 outputs is done in float
    assert load_model(tmp_path / "q.pt").metadata["arch"] == {"name": "custom", "target": "tests.archs:TinyUNet",
                                                             "kwargs": {}}


def test_channel_pruned_and_unstructured_pruned_tinybeauty(tmp_path):
    cfg = TinyBeautyConfig(n_res=1, first=5, down1=7, stream=6, res_hidden=(3, 4), up1=9, up2=4)
    torch.manual_seed(1)
    pruned = TinyBeauty(cfg).eval()
    with torch.no_grad():
        pruned.out.conv.weight.mul_(0.1)
    r = quantize_file(save_small(tmp_path / "p.pt", pruned, size=32), tmp_path / "pq.pt",
                       fast_config(keep_float="none"))
    assert r.quality["fidelity_psnr_db"] > 35
    assert "channel-pruned" in load_model(tmp_path / "pq.pt").metadata["architecture"]

    sparse = small_tinybeauty()
    with torch.no_grad():
        for p in sparse.parameters():
            if p.dim() == 4:
                p.mul_((p.abs() > p.abs().flatten().median()).float())
    r = quantize_file(save_small(tmp_path / "u.pt", sparse, size=32), tmp_path / "uq.pt",
                       fast_config(keep_float="none"))
    meta = load_model(tmp_path / "uq.pt").metadata
    assert meta["nonzero_parameters"] < 0.6 * meta["parameters"]
    assert r.quality["fidelity_psnr_db"] > 35


def test_auto_backend_excludes_engines_that_warn_and_times_the_rest(tmp_path, monkeypatch):
    real = qz.accuracy_warning
    monkeypatch.setattr(qz, "accuracy_warning",
                        lambda b: "may have accuracy issues on CPU without VNNI" if b == "onednn" else real(b))
    ranked_at = []
    real_fastest = qz.fastest_runs
    monkeypatch.setattr(qz, "fastest_runs", lambda fns, threads, **kw: ranked_at.append(threads)
                        or real_fastest(fns, threads, **kw))
    src = save_small(tmp_path / "s.pt")
    r = quantize_file(src, tmp_path / "q.pt", fast_config(backend="auto", keep_float="none", threads=2))
    # ranked at the threads the file will run with, and the result and the file say so
    assert ranked_at and set(ranked_at) == {2} and r.ranking["threads"] == 2
    assert "fastest at 2 thread(s)" in r.backend_reason
    meta = load_model(tmp_path / "q.pt").metadata
    assert meta["ranking"]["threads"] == 2 and meta["history"][-1]["figures"]["ranking_threads"] == 2
    trials = {t.backend: t for t in r.backends}
    if "onednn" in torch.backends.quantized.supported_engines:
        assert trials["onednn"].status == "excluded" and "VNNI" in trials["onednn"].note
        assert r.backend != "onednn"
    chosen = [t for t in r.backends if t.status == "chosen"]
    assert len(chosen) == 1 and chosen[0].backend == r.backend
    timed = [t for t in r.backends if t.status != "excluded"]
    assert all(t.all_int8_latency_ms is not None for t in timed)
    for t in timed:
        if t.status == "skipped":
            assert "already slower than" in t.note
        elif t.backend != r.backend and t.latency_ms is not None and t.status == "meets target":
            assert t.latency_ms >= chosen[0].latency_ms


def test_explicit_backend_that_warns_is_used_with_a_warning(monkeypatch):
    monkeypatch.setattr(qz, "accuracy_warning", lambda b: "accuracy issues on CPU without VNNI")
    progress = SilentProgress()
    backends, excluded = qz.usable_backends("x86", progress)
    assert backends == ["x86"] and excluded == []
    assert any(n.startswith("Warning: x86") for n in progress.notes)
    with pytest.raises(UnsupportedError, match="every quantized engine warns"):
        qz.usable_backends("auto", SilentProgress())


def test_backend_missing_from_this_build(monkeypatch):
    monkeypatch.setattr(qz, "supported_backends", lambda: ["qnnpack"])
    with pytest.raises(UnsupportedError, match="not available in this PyTorch build"):
        qz.usable_backends("x86", SilentProgress())


def test_a_network_without_quantizable_layers(tmp_path):
    torch.save({"scale": torch.zeros(1)}, tmp_path / "noconv.pt")
    with pytest.raises(UnsupportedError, match="no convolution or linear layer"):
        quantize_file(tmp_path / "noconv.pt", tmp_path / "q.pt", fast_config(), arch="tests.archs:NoConv")


@pytest.mark.slow
@pytest.mark.realdata
def test_the_released_checkpoint_end_to_end(realdata, tmp_path):
    """Defaults on the authors' checkpoint: meets the fidelity target, and makes up the real photo."""
    from PIL import Image as PILImage

    from tinybeauty_cli.flow.apply import makeup_full_resolution

    from tests.helpers import REAL_CKPT, REAL_FACE
    r = quantize_file(REAL_CKPT, tmp_path / "released_int8.pt", QuantizeConfig())
    assert r.quality["fidelity_psnr_db"] >= 45 and r.size["ratio"] < 0.2  # the release also stores optimizer state
    int8, ref = open_runner(tmp_path / "released_int8.pt"), open_runner(REAL_CKPT)
    photo = np.asarray(PILImage.open(REAL_FACE).convert("RGB"))
    a = makeup_full_resolution(int8, photo).astype(np.float64)
    b = makeup_full_resolution(ref, photo).astype(np.float64)
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 40


def test_float_torchscript_and_all_float_requests_are_refused(tmp_path):
    model = small_tinybeauty()
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 32, 32)), str(tmp_path / "ts.pt"))
    with pytest.raises(UnsupportedError, match="TorchScript archive; tbopt quantize needs the float weights"):
        quantize_file(tmp_path / "ts.pt", tmp_path / "q.pt", fast_config())
    src = save_small(tmp_path / "s.pt", size=32)
    with pytest.raises(ConfigError, match="keeps every layer in float"):
        quantize_file(src, tmp_path / "q.pt", fast_config(keep_float="content_encoder,res,upconv1,upconv2,out"))
    assert not (tmp_path / "q.pt").exists()


def test_measure_latencies_interleaves_and_restores_threads():
    from tinybeauty_cli.runtime.timing import measure_latencies
    calls = []
    before = torch.get_num_threads()
    lat = measure_latencies({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=1,
                            threads=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then alternating timed runs
    assert set(lat) == {"a", "b"} and lat["a"].runs == 3 and lat["a"].threads == 1 and lat["a"].min_ms <= lat["a"].p50_ms
    assert torch.get_num_threads() == before


def test_timings_say_how_freed_memory_was_handled():
    import platform

    from tinybeauty_cli.runtime.timing import measure_latency, steady_allocator

    lat = measure_latency(lambda: torch.zeros(1 << 20).sum(), runs=2, warmup=1, threads=1)
    assert lat.allocator == steady_allocator() and lat.to_dict()["allocator"] == lat.allocator
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert lat.allocator.startswith("glibc malloc keeping freed memory")


def test_the_engine_ranking_leaves_the_file_a_pinned_engine_makes():
    """With --backend auto the engines are timed on copies that saw one calibration image; the chosen
    engine's model is calibrated as a run with it pinned calibrates it (same batches), so that the
    printed command (engine pinned) makes the same file. Continuing the ranking's calibration gave
    other activation ranges (measured: other outputs with 2 and 20 calibration images)."""
    from tinybeauty_cli.core.contexts import quantized_engine
    from tinybeauty_cli.core.images import synthetic_unlabeled, uint8_to_model
    from tinybeauty_cli.quantize.transform import quantize_module

    if len(qz.usable_backends("auto", SilentProgress())[0]) < 2:
        pytest.skip("one usable quantized engine here: nothing is ranked")
    model = small_tinybeauty().eval()
    calib = torch.from_numpy(uint8_to_model(synthetic_unlabeled(20, 32).inputs))
    cfg = dict(threads=1, min_psnr_db=1.0)
    auto, outcome = quantize_module(model, QuantizeConfig(backend="auto", **cfg), calib)
    assert len([t for t in outcome.backends if t.status != "excluded"]) >= 2  # the engines were ranked
    pinned, _ = quantize_module(model, QuantizeConfig(backend=outcome.backend, **cfg), calib)
    with quantized_engine(outcome.backend), torch.no_grad():
        assert torch.equal(auto(calib), pinned(calib))
