"""Library tests of tinybeauty_cli.prune on tiny fixtures."""

import copy

import numpy as np
import pytest
import torch

from tinybeauty_cli.core.artifact import ArchSpec
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.errors import ConfigError, InputError, OutputExistsError, UsageError
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig, config_from_state_dict
from tinybeauty_cli.flow.prune import default_output_name, prune_file, prune_loaded, torch_scorer, unlabeled_images
from tinybeauty_cli.prune import channel
from tinybeauty_cli.prune.channel import prune_channels
from tinybeauty_cli.prune.config import CONFIG_VERSION, DEFAULT_CHANNEL_FINETUNE_STEPS, PruneConfig
from tinybeauty_cli.prune.distill import distill
from tinybeauty_cli.prune.layers import excluded_layers, prunable_layers
from tinybeauty_cli.prune.magnitude import prune_magnitude
from tinybeauty_cli.prune.transform import prune_module

from tests.archs import NoConv, TinyUNet
from tests.helpers import small_tinybeauty

FAST = dict(finetune_images=4, calibration_images=4, batch_size=2)


def _images(n=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_rate_outside_0_1_is_a_usage_error(rate):
    with pytest.raises(UsageError) as exc:
        PruneConfig(rate=rate)
    assert exc.value.exit_code == 2


def test_config_round_trips_and_resolves_default_steps():
    cfg = PruneConfig(rate=0.3, method="channel", exclude=("upconv1",))
    d = cfg.to_dict()
    assert d["finetune_steps"] == DEFAULT_CHANNEL_FINETUNE_STEPS and d["version"] == CONFIG_VERSION
    assert PruneConfig.from_dict(d) == PruneConfig(rate=0.3, method="channel", exclude=("upconv1",),
                                                       finetune_steps=DEFAULT_CHANNEL_FINETUNE_STEPS)
    assert PruneConfig(rate=0.3).steps == 0
    assert d["loss"] == "l2" and PruneConfig.from_dict({**d, "loss": "l1"}).loss == "l1"
    with pytest.raises(UsageError):
        PruneConfig(rate=0.3, method="random")
    with pytest.raises(ConfigError, match="loss"):
        PruneConfig(rate=0.3, loss="huber")


# --- magnitude ------------------------------------------------------------------------------------


def test_magnitude_prunes_each_layer_at_its_own_quantile():
    model = small_tinybeauty()
    before = _weights(model)
    thresholds = prune_magnitude(model, 0.3)
    for name, layer in prunable_layers(model).items():
        w, old = layer.weight.detach(), before[f"{name}.weight"]
        thr = thresholds[name]
        assert thr == pytest.approx(float(np.quantile(old.abs().double().numpy(), 0.3)))
        zeroed = w == 0
        # the rule, exactly: |w| <= threshold -> 0, every other weight untouched
        assert torch.all(old.abs()[zeroed].double() <= thr)
        assert torch.equal(w[~zeroed], old[~zeroed]) and torch.all(old.abs()[~zeroed].double() > thr)
        assert zeroed.float().mean().item() == pytest.approx(0.3, abs=0.01), name
    for key, value in model.state_dict().items():  # biases and norm parameters untouched
        if not key.endswith("conv.weight"):
            assert torch.equal(value, before[key]), key


def test_pruning_again_at_the_same_rate_removes_nothing_more():
    model = small_tinybeauty()
    prune_magnitude(model, 0.3)
    once = _weights(model)
    prune_magnitude(model, 0.3)
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    prune_magnitude(model, 0.2)  # a lower rate: the zeros already exceed it
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    prune_magnitude(model, 0.5)  # a higher rate takes each layer to 50%, not 30% + 50%
    for layer in prunable_layers(model).values():
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "global", "channel"])
def test_rate_zero_changes_nothing(method):
    model = small_tinybeauty()
    before = _weights(model)
    if method == "channel":
        prune_channels(model, 0.0, _images())
    else:
        prune_magnitude(model, 0.0, global_threshold=method == "global")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_global_uses_one_threshold_and_prunes_layers_unevenly():
    model = small_tinybeauty()
    thresholds = prune_magnitude(model, 0.4, global_threshold=True)
    assert len(set(thresholds.values())) == 1
    layers = prunable_layers(model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    assert zeros / total == pytest.approx(0.4, abs=0.002)
    per_layer = [float((m.weight == 0).float().mean()) for m in layers]
    assert max(per_layer) - min(per_layer) > 0.05


def test_exclude_keeps_layers_and_a_pattern_matching_nothing_is_an_error():
    model = small_tinybeauty()
    names = list(prunable_layers(model))
    chosen = excluded_layers(names, ["upconv*", "content_encoder.down1"])
    assert chosen == {"upconv1.conv", "upconv2.conv", "content_encoder.down1.conv"}
    before = _weights(model)
    prune_magnitude(model, 0.5, exclude=chosen)
    for name in chosen:
        assert torch.equal(model.state_dict()[f"{name}.weight"], before[f"{name}.weight"])
    with pytest.raises(ConfigError, match="matches no conv layer"):
        excluded_layers(names, ["upconv3"])


def test_a_model_without_conv_layers_is_refused():
    with pytest.raises(InputError, match="no Conv2d or ConvTranspose2d"):
        prune_magnitude(NoConv(), 0.3)


# --- channel pruning ------------------------------------------------------------------------------


def test_channel_pruning_removes_channels_in_coupled_groups():
    model = small_tinybeauty(dim=8, n_res=1)
    groups = prune_channels(model, 0.25, _images())
    cfg = config_from_state_dict(model.state_dict())
    # every group of 8 loses 2; input and output keep their 3 channels
    assert (cfg.first, cfg.down1, cfg.stream, cfg.up1, cfg.up2) == (6, 6, 6, 6, 6)
    assert cfg.res_hidden == (6, 6) and cfg.in_channels == 3 and cfg.out_channels == 3
    assert model.upconv1.conv.weight.shape[1] == 12 and model.upconv2.conv.weight.shape[1] == 12
    assert model.upconv1.norm.gamma.shape == (6,) and model.upconv2.norm.beta.shape == (6,)
    assert len(groups) == 7
    stream = next(g for g in groups if "content_encoder.down2.conv" in g.layers)
    assert set(stream.layers) == {"content_encoder.down2.conv", "content_encoder.resblocks.model.0.model.1.conv",
                                  "res.model.0.model.1.conv"}
    assert "upconv1.conv" in stream.consumers
    rebuilt = TinyBeauty(cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _images(1)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_group_rates_give_the_groups_of_the_named_convs_their_own_rate():
    model = small_tinybeauty(dim=8, n_res=1)
    groups = prune_channels(model, 0.25, _images(), group_rates={"content_encoder.conv_first.conv": 0.5,
                                                                 "upconv2.conv": 0.75})
    cfg = config_from_state_dict(model.state_dict())
    assert (cfg.first, cfg.up2) == (4, 2)  # their own rates
    assert (cfg.down1, cfg.stream, cfg.up1) == (6, 6, 6) and cfg.res_hidden == (6, 6)  # the common rate
    assert {g.layers[0]: g.channels_after for g in groups}["upconv2.conv"] == 2
    rebuilt = TinyBeauty(cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_group_rates_alone_prune_only_their_groups():
    model = small_tinybeauty(dim=8, n_res=1)
    groups = prune_channels(model, 0.0, _images(), group_rates={"upconv2.conv": 0.5})
    cfg = config_from_state_dict(model.state_dict())
    assert cfg.up2 == 4 and (cfg.first, cfg.down1, cfg.stream, cfg.up1) == (8, 8, 8, 8)
    assert [g.layers for g in groups] == [["upconv2.conv"]]


def test_group_rate_option_is_parsed_checked_and_rebuilt():
    cfg = PruneConfig(rate=0.3, method="channel", group_rates=("upconv2=0.66", "content_encoder.conv_first=0.5"))
    assert cfg.group_rates == (("upconv2", 0.66), ("content_encoder.conv_first", 0.5))
    assert cfg.to_dict()["group_rates"] == {"upconv2": 0.66, "content_encoder.conv_first": 0.5}
    assert PruneConfig.from_dict(cfg.to_dict()).group_rates == cfg.group_rates
    assert "--group-rate upconv2=0.66 --group-rate content_encoder.conv_first=0.5" in cfg.command_line()
    assert "group_rates" not in PruneConfig(rate=0.3, method="channel").to_dict()  # old histories unchanged
    assert PruneConfig(rate=0.0, method="channel", group_rates=("upconv2=0.5",)).any_pruning
    for bad in ("upconv2", "upconv2=x", "=0.5", "upconv2=1.0", "upconv2=-0.1"):
        with pytest.raises(UsageError):
            PruneConfig(rate=0.3, method="channel", group_rates=(bad,))
    with pytest.raises(UsageError, match="twice"):
        PruneConfig(rate=0.3, method="channel", group_rates=("a=0.1", "a=0.2"))
    with pytest.raises(UsageError, match="channel only"):
        PruneConfig(rate=0.3, method="magnitude", group_rates=("a=0.1",))


def test_group_rate_naming_no_conv_is_a_config_error():
    model = small_tinybeauty(dim=8, n_res=1)
    cfg = PruneConfig(rate=0.25, method="channel", finetune_steps=0, group_rates=("nosuchlayer=0.5",), **FAST)
    with pytest.raises(ConfigError, match="--group-rate 'nosuchlayer' matches no conv layer"):
        prune_module(model, cfg, _images())


def test_coupled_channels_are_cut_at_the_same_index_everywhere(monkeypatch):
    """Silence one channel of every InstanceNorm group, prune exactly those: the output does not change.

    A constant conv output is exactly 0 after InstanceNorm, so a silenced channel feeds
    nothing to anyone; removing it must leave the network's function intact, which only
    holds if every coupled layer (the whole residual stream, the skips) lost that channel.
    """
    torch.manual_seed(0)
    model = TinyBeauty(TinyBeautyConfig.uniform(8, 1)).eval()
    victims = {"content_encoder.conv_first.conv": 5, "content_encoder.down1.conv": 1,
               "content_encoder.resblocks.model.0.model.0.conv": 6, "res.model.0.model.0.conv": 0,
               "content_encoder.down2.conv": 3, "content_encoder.resblocks.model.0.model.1.conv": 3,
               "res.model.0.model.1.conv": 3}  # the last three are the residual stream
    layers = prunable_layers(model)
    with torch.no_grad():
        for name, c in victims.items():
            layers[name].weight[c] = 0
            layers[name].bias[c] = 0.7
    x = _images(2)
    with torch.no_grad():
        expected = model(x)
    names = {m: n for n, m in model.named_modules()}
    real = channel.channel_importance

    def victims_last(group, rms):
        score, consumers = real(group, rms)
        fake = torch.ones_like(score)
        fake[victims[names[group[0].dep.target.module]]] = 0
        return fake, consumers

    monkeypatch.setattr(channel, "channel_importance", victims_last)
    # the LayerNorm groups are excluded: LayerNorm mixes all channels, so cutting one is not exact
    groups = prune_channels(model, 1 / 8, _images(), exclude={"upconv1.conv", "upconv2.conv"},
                              reconstruct=False)
    assert len(groups) == 5
    for name in victims:
        assert layers[name].weight.shape[0] == 7, name
    assert model.upconv1.conv.weight.shape[1] == 14 and model.upconv2.conv.weight.shape[1] == 15
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_importance_follows_the_consumer_not_the_producers_filter():
    model = small_tinybeauty(dim=8, n_res=1)
    with torch.no_grad():
        first = model.content_encoder.conv_first.conv
        first.weight[2] *= 50  # the biggest filter ...
        model.content_encoder.down1.conv.weight[:, 2] = 0  # ... whose channel nobody reads
    prune_channels(model, 0.25, _images())
    kept = model.content_encoder.conv_first.conv.weight
    # channel 2 (50x larger than the rest) is gone: no kept filter has that norm
    assert kept.flatten(1).norm(dim=1).max() < 10 * kept.flatten(1).norm(dim=1).median()


def test_reconstruction_brings_the_pruned_model_closer_to_the_original():
    torch.manual_seed(0)
    original = TinyBeauty(TinyBeautyConfig.uniform(8, 1)).eval()
    calibration, held_out = _images(8, 64, seed=1), _images(4, 64, seed=2)
    errors = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(original)
        prune_channels(model, 0.25, calibration, reconstruct=reconstruct)
        with torch.no_grad():
            errors[reconstruct] = float((model(held_out) - original(held_out)).pow(2).mean())
    assert errors[True] < 0.7 * errors[False], errors


def test_channel_pruning_a_users_unet_with_convtranspose():
    torch.manual_seed(0)
    model = TinyUNet(width=8).eval()
    with torch.no_grad():
        model.enc1[1].running_var.uniform_(0.5, 2)
    prune_channels(model, 0.25, _images(4, 32))
    assert model.up.weight.shape[:2] == (12, 6)  # ConvTranspose2d: (in, out)
    assert model.head.weight.shape[0] == 3 and model.enc1[0].weight.shape[1] == 3
    rebuilt = ArchSpec.custom("tests.archs:TinyUNet", {"width": 8}).build(model.state_dict())
    rebuilt.load_state_dict(model.state_dict())
    x = _images(1, 32)
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x))


# --- distillation ---------------------------------------------------------------------------------


def test_distillation_keeps_zeros_and_is_deterministic():
    teacher = small_tinybeauty(dim=8, n_res=1)
    cfg = PruneConfig(rate=0.5, finetune_steps=4, lr=1e-2, **FAST)
    students = []
    for _ in range(2):
        student = copy.deepcopy(teacher)
        prune_magnitude(student, 0.5)
        zeros = {n: m.weight == 0 for n, m in prunable_layers(student).items()}
        losses = distill(student, teacher, _images(4, 64), cfg)
        assert len(losses) == 4
        for n, m in prunable_layers(student).items():
            assert torch.all(m.weight[zeros[n]] == 0)
        students.append(student)
    a, b = (s.state_dict() for s in students)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["upconv1.conv.bias"], teacher.state_dict()["upconv1.conv.bias"])


# --- the transform: module in, module out -----------------------------------------------------------


def test_prune_module_prunes_a_copy_and_reports_what_it_did():
    model = small_tinybeauty(dim=8, n_res=1)
    before = _weights(model)
    seen = []
    cfg = PruneConfig(rate=0.25, method="channel", finetune_steps=2, **FAST)
    pruned, report = prune_module(model, cfg, _images(4, 64), before_finetune=lambda m: seen.append(
        config_from_state_dict(m.state_dict()).stream))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is left as is
    assert config_from_state_dict(pruned.state_dict()).stream == 6 and not pruned.training
    assert seen == [6]  # called once, with the pruned model, before fine-tuning
    assert report.size == 64 and report.after.macs < report.before.macs and report.groups
    assert report.quality == {} and report.input is None and report.architecture == "TinyBeauty"
    assert report.finetune["steps"] == 2 and report.finetune["images"] is None
    assert set(report.seconds) == {"prune", "finetune", "total"}


def test_prune_module_without_images():
    model = small_tinybeauty(dim=8, n_res=1)
    pruned, report = prune_module(model, PruneConfig(rate=0.3), size=32)  # magnitude needs no images
    assert report.size == 32 and report.after.nonzero_parameters < report.before.nonzero_parameters
    with pytest.raises(ConfigError, match="no unlabeled images"):
        prune_module(model, PruneConfig(rate=0.3, method="channel", finetune_steps=0))
    with pytest.raises(ConfigError, match="no unlabeled images"):
        prune_module(model, PruneConfig(rate=0.3, finetune_steps=1))
    unchanged, report = prune_module(model, PruneConfig(rate=0.0, finetune_steps=1))  # nothing to fine-tune
    assert report.finetune["steps"] == 0 and "nothing was pruned" in report.notes[0]


# --- the whole step -------------------------------------------------------------------------------


def _eval_set():
    return builtin_test_set(256, limit=2)


def test_prune_loaded_reports_and_records_history(small_artifact):
    loaded = load_model(small_artifact)
    cfg = PruneConfig(rate=0.3, method="channel", finetune_steps=2, **FAST)
    artifact, model, report = prune_loaded(loaded, cfg, eval_images=_eval_set())
    assert artifact.history[-1].step == "prune" and artifact.history[0].step == "test-fixture"
    assert artifact.history[-1].config["method"] == "channel"
    assert artifact.arch.name == "tinybeauty" and artifact.arch.config["stream"] == 5  # floor(0.7 x 8)
    assert report.after.macs < report.before.macs and report.after.parameters < report.before.parameters
    q = report.quality
    assert q["fidelity_psnr_db"] > 15 and q["target_psnr_before_db"] is not None
    assert "fidelity_pruned_only_db" in q and report.finetune["steps"] == 2
    assert set(report.seconds) >= {"prune", "finetune", "evaluate", "total"}


def test_prune_loaded_scores_every_model_through_the_scorer(small_artifact):
    loaded = load_model(small_artifact)
    images = _eval_set()
    default = torch_scorer(loaded.preprocessing, images)
    calls = []

    def scorer(module, reference, description):
        calls.append((description, reference is None))
        return default(module, reference, description)

    cfg = PruneConfig(rate=0.3, method="channel", finetune_steps=1, **FAST)
    _, _, report = prune_loaded(loaded, cfg, eval_images=images, scorer=scorer)
    assert calls == [("scoring the input model", True), ("scoring before fine-tuning", False),
                     ("scoring the pruned model", False)]
    assert list(report.seconds) == ["images", "evaluate", "prune", "finetune", "total"]
    assert report.input == str(small_artifact) and report.finetune["images"].startswith("synthetic")


def test_prune_writes_an_artifact_and_never_the_input(tmp_path, small_artifact):
    out = tmp_path / "pruned.pt"
    cfg = PruneConfig(rate=0.3, **FAST)
    report = prune_file(small_artifact, cfg, output=out, eval_limit=2)
    assert report.after.size_bytes == out.stat().st_size
    assert report.after.zipped_bytes < report.before.zipped_bytes
    loaded = load_model(out)
    assert [h.step for h in loaded.history] == ["test-fixture", "prune"]
    with pytest.raises(OutputExistsError):
        prune_file(small_artifact, cfg, output=out, eval_limit=2)
    before = small_artifact.read_bytes()
    with pytest.raises(InputError, match="is the input"):
        prune_file(small_artifact, cfg, output=small_artifact, force=True, eval_limit=2)
    assert small_artifact.read_bytes() == before


def test_rate_zero_writes_identical_weights(tmp_path, small_artifact):
    out = tmp_path / "same.pt"
    prune_file(small_artifact, PruneConfig(rate=0.0, method="channel", finetune_steps=3, **FAST),
            output=out, eval_limit=2)
    a, b = load_model(small_artifact).artifact.state_dict, load_model(out).artifact.state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_is_written_for_bad_input(tmp_path, small_artifact):
    out = tmp_path / "x.pt"
    with pytest.raises(ConfigError):
        prune_file(small_artifact, PruneConfig(rate=0.3, exclude=("nope",)), output=out, eval_limit=2)
    noconv = tmp_path / "noconv.pt"
    torch.save(NoConv().state_dict(), noconv)
    with pytest.raises(InputError, match="no Conv2d"):
        prune_file(noconv, PruneConfig(rate=0.3), output=out, arch="tests.archs:NoConv", eval_limit=2)
    assert not out.exists()


def test_default_output_name_says_what_was_done(tmp_path):
    name = default_output_name(tmp_path / "tinybeauty_demo.pt", PruneConfig(rate=0.3, method="channel"))
    assert name.name == "tinybeauty_demo_pruned-channel-30.pt"
    assert default_output_name(tmp_path / "m.pt", PruneConfig(rate=0.125)).name == "m_pruned-magnitude-12p5.pt"


def test_unlabeled_images_use_only_the_inputs_of_pairs(tmp_path):
    from PIL import Image

    for sub in ("input", "target"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / sub / "a.png")
    images = unlabeled_images(tmp_path, 32, 10)
    assert images.targets is None and images.inputs.shape == (1, 32, 32, 3)
