import os
import pickle

import pytest
import torch

from tinybeauty_cli.core.artifact import ArchSpec, Artifact, HistoryStep, save_artifact
from tinybeauty_cli.core.checkpoint import load_model, pickled_globals
from tinybeauty_cli.core.errors import (
    ArchitectureMismatchError,
    ConfigError,
    InputError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from tinybeauty_cli.core.model import TinyBeauty

from tests.archs import TinyUNet
from tests.helpers import REAL_CKPT, small_tinybeauty


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap, expect", [
    (lambda sd: sd, "bare state dict"),
    (lambda sd: {"cleaner": sd, "optimizer": {}, "scheduler": {}, "epoch": 3}, "released TinyBeauty format"),
    (lambda sd: {"state_dict": sd, "epoch": 1}, "under 'state_dict'"),
    (lambda sd: {"model_state_dict": sd}, "under 'model_state_dict'"),
    (lambda sd: {"model": sd}, "under 'model'"),
    (lambda sd: {"net": sd}, "under 'net'"),
    (lambda sd: {"ema": sd, "model": {"junk": 1}}, "under 'ema'"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, "'module.' prefix removed"),
    (lambda sd: {"model": {"module." + k: v for k, v in sd.items()}}, "'module.' prefix removed"),
])
def test_every_training_layout_loads_and_says_what_it_found(tmp_path, wrap, expect):
    model = small_tinybeauty()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(model.state_dict()), path)
    loaded = load_model(path)
    assert expect in loaded.found
    assert loaded.kind == "float"
    assert _same_weights(loaded.module, model)


@pytest.mark.realdata
def test_released_checkpoint_loads_strictly(realdata):
    loaded = load_model(REAL_CKPT)
    assert "released TinyBeauty format" in loaded.found
    assert sum(p.numel() for p in loaded.module.parameters()) == 85_227


def test_artifact_round_trip_keeps_config_preprocessing_and_history(tmp_path):
    from tinybeauty_cli.core.model import TinyBeautyConfig

    cfg = TinyBeautyConfig(n_res=1, first=6, down1=5, stream=7, res_hidden=(3, 4), up1=5, up2=6)
    model = TinyBeauty(cfg)
    art = Artifact.for_tinybeauty(cfg, model.state_dict(),
                                  history=[HistoryStep.now("prune", "tbopt prune x", {"rate": 0.3}, {"psnr": 35.0})])
    path = save_artifact(art, tmp_path / "a.pt")
    payload = torch.load(path, weights_only=True)  # a stranger can open it safely
    assert payload["format"] == "tbopt-artifact" and payload["format_version"] == 1
    loaded = load_model(path)
    assert loaded.artifact.arch.config == cfg.to_dict()
    assert loaded.preprocessing.size == 256 and loaded.preprocessing.value_range == (-1.0, 1.0)
    assert [h.step for h in loaded.history] == ["prune"]
    assert loaded.history[0].config == {"rate": 0.3}
    assert _same_weights(loaded.module, model)


def test_artifact_is_not_overwritten_without_force(tmp_path):
    model = small_tinybeauty()
    art = Artifact.for_tinybeauty(model.config, model.state_dict())
    path = save_artifact(art, tmp_path / "a.pt")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_artifact(art, path)
    assert path.read_bytes() == before
    save_artifact(art, path, force=True)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    model = small_tinybeauty()
    art = Artifact.for_tinybeauty(model.config, model.state_dict())

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(art, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_future_artifact_version_is_refused(tmp_path):
    model = small_tinybeauty()
    payload = Artifact.for_tinybeauty(model.config, model.state_dict()).to_payload()
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "f.pt")
    with pytest.raises(InputError, match="format version 99"):
        load_model(tmp_path / "f.pt")


def test_torchscript_archive_loads_with_its_metadata(tmp_path):
    model = small_tinybeauty()
    scripted = torch.jit.trace(model, torch.zeros(1, 3, 32, 32))
    path = tmp_path / "ts.pt"
    torch.jit.save(scripted, str(path), _extra_files={"tbopt.json": '{"format": "tbopt-torchscript", "history": []}'})
    loaded = load_model(path)
    assert loaded.kind == "torchscript"
    assert loaded.metadata["format"] == "tbopt-torchscript"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.module(x), model(x))


class _Int8Conv(torch.nn.Module):
    """The smallest int8 network: quantize, one int8 conv, dequantize (returns a residual)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.ao.nn.quantized.Conv2d(3, 3, 3, padding=1)
        w = torch.randn(3, 3, 3, 3) * 0.05
        self.conv.set_weight_bias(torch.quantize_per_tensor(w, 0.002, 0, torch.qint8), torch.zeros(3))

    def forward(self, x):
        return self.conv(torch.quantize_per_tensor(x, 1 / 127, 128, torch.quint8)).dequantize()


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_int8_torchscript_borrows_its_engine_and_leaves_the_global_one(tmp_path):
    from tinybeauty_cli.core.contexts import quantized_engine
    from tinybeauty_cli.runtime.runners import open_runner

    supported = torch.backends.quantized.supported_engines
    other = next((e for e in ("qnnpack", "onednn", "fbgemm") if e in supported), None)
    if "x86" not in supported or other is None:
        pytest.skip("needs the x86 engine and another one")
    path = tmp_path / "int8.pt"
    meta = '{"quantized": true, "quantized_engine": "x86", "engine": "PyTorch int8 x86 (TorchScript)", ' \
           '"preprocessing": {"size": 16}}'
    with quantized_engine("x86"):
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(_Int8Conv().eval()), str(path), _extra_files={"tbopt.json": meta})
    before = torch.backends.quantized.engine
    with quantized_engine(other):  # the global engine differs from the file's
        runner = open_runner(path)
        assert torch.backends.quantized.engine == other  # loading borrowed x86 and gave it back
        assert runner.kind == "int8" and runner.loaded.quantized_engine == "x86"
        x = torch.rand(2, 3, 16, 16).numpy() * 2 - 1
        y = runner.predict(x)
        assert y.shape == x.shape and abs(y).max() <= 1
        assert torch.backends.quantized.engine == other  # running borrowed it too
    assert torch.backends.quantized.engine == before


# --- refusals --------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "RAN"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code") as info:
        load_model(path)
    assert "system" in str(info.value)
    assert "state_dict()" in info.value.hint and "--trust-pickle" in info.value.hint
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_model(raw)
    assert not marker.exists()


def test_pickled_globals_reads_without_unpickling(tmp_path):
    marker = tmp_path / "RAN"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    names = pickled_globals(raw)
    assert any(n.endswith("system") for n in names)
    assert not marker.exists()


def test_whole_pickled_module_needs_trust_pickle(tmp_path):
    model = small_tinybeauty()
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError, match="TinyBeauty"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert "pickled TinyBeauty module" in loaded.found
    assert _same_weights(loaded.module, model)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (os.urandom(4096), "not a readable PyTorch checkpoint"),
])
def test_garbage_files_are_refused(tmp_path, content, match):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_model(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(small_tinybeauty().state_dict(), path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_model(path)


def test_directory_and_missing_file_are_refused(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope.pt")


def test_other_architecture_lists_what_does_not_fit(tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(TinyUNet().state_dict(), path)
    with pytest.raises(ArchitectureMismatchError, match="not TinyBeauty") as info:
        load_model(path)
    assert "--arch" in info.value.hint


def test_mismatched_shapes_and_keys_are_listed_with_counts(tmp_path):
    sd = small_tinybeauty().state_dict()
    sd["upconv1.conv.weight"] = torch.zeros(8, 17, 3, 3)
    del sd["out.conv.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ArchitectureMismatchError) as info:
        load_model(path)
    msg = str(info.value)
    assert "1 missing: out.conv.bias" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "1 mismatched: upconv1.conv.weight: (8, 17, 3, 3) in the file vs (8, 16, 3, 3)" in msg


# --- a user's own architecture ---------------------------------------------------------------------


def test_custom_arch_loads_with_kwargs(tmp_path):
    torch.manual_seed(0)
    net = TinyUNet(width=6).eval()
    path = tmp_path / "unet.pt"
    torch.save({"model": net.state_dict()}, path)
    loaded = load_model(path, arch="tests.archs:TinyUNet", arch_kwargs='{"width": 6}')
    assert loaded.artifact.arch == ArchSpec.custom("tests.archs:TinyUNet", {"width": 6})
    assert _same_weights(loaded.module, net)
    # a custom artifact rebuilds from the file alone
    save_artifact(loaded.artifact, tmp_path / "unet_art.pt")
    again = load_model(tmp_path / "unet_art.pt")
    assert _same_weights(again.module, net)


def test_custom_arch_with_narrower_layers_rebuilds_from_shapes(tmp_path):
    """A channel-pruned custom network: its constructor does not know the new widths."""
    net = TinyUNet(width=8)
    sd = net.state_dict()
    keep = torch.arange(5)  # keep 5 of enc1's 8 channels
    for k in ("enc1.0.weight", "enc1.0.bias", "enc1.1.weight", "enc1.1.bias", "enc1.1.running_mean", "enc1.1.running_var"):
        sd[k] = sd[k][keep].clone()
    sd["enc2.0.weight"] = sd["enc2.0.weight"][:, keep].clone()
    sd["dec.0.weight"] = torch.cat([sd["dec.0.weight"][:, keep], sd["dec.0.weight"][:, 8:]], 1).clone()
    spec = ArchSpec.custom("tests.archs:TinyUNet", {"width": 8})
    path = save_artifact(Artifact(spec, sd), tmp_path / "pruned.pt")
    loaded = load_model(path)
    assert loaded.module.enc1[0].out_channels == 5
    assert loaded.module(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("arch, kwargs, match", [
    ("no_colon", None, "package.module:ClassName"),
    ("nosuchmodule_xyz:Net", None, "cannot import"),
    ("tests.archs:Missing", None, "not an nn.Module"),
    ("tests.archs:TinyUNet", "{bad json", "not valid JSON"),
    ("tests.archs:TinyUNet", "[1, 2]", "JSON object"),
    ("tests.archs:TinyUNet", '{"nope": 1}', "failed"),
])
def test_bad_arch_options_are_clear(small_state_dict_file, arch, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(small_state_dict_file, arch=arch, arch_kwargs=kwargs)
