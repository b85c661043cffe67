"""Issue 20, class 8: a net under every class -- no command, on any input of the corpora, prints
``internal error``, a traceback, or ``nan``/``inf`` where a figure belongs.

The corpora: bad models like those of ``test_bad_inputs_refused.py`` (NaN and Inf weights, finite
weights that overflow, TorchScript files of other networks), the checkpoint that is finite on the
probe image but NaN on faces (``tests/models.py``), and every network of ``tests/archs.py`` (its
``ARCHS`` and any other ``nn.Module`` class it defines, found when the test runs, so that networks
added there are covered without a change here). A command may succeed or refuse with one line; it
may not fail any other way.

Default run: the NaN checkpoint through every command, each network through the commands that only
read it, each bad model through ``bench`` (small: 32 px). The whole cross product is slow.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tinybeauty_cli.core.artifact import Artifact, ArchSpec, Preprocessing, save_artifact

from .. import archs
from ..helpers import MODEL_COMMANDS, cheap_command_args, run, small_tinybeauty
from ..models import NAN_FIGURE, save_nan_on_faces

SIZE = 32
NAN_SIZE = 64  # at 32 px no scaling separates the probe image from faces
COMMANDS = MODEL_COMMANDS


def command_args(command: str, model: Path, root: Path, out: Path) -> list:
    """``command`` on ``model`` with the cheapest options; a photo and a second model from ``root``."""
    return cheap_command_args(command, model, root / "photo.png", root / "good.pt", out)


def arch_classes() -> dict[str, type]:
    """Every network of tests/archs.py: its ARCHS, and any other nn.Module class defined there."""
    found = dict(getattr(archs, "ARCHS", {}))
    for name, obj in inspect.getmembers(archs, inspect.isclass):
        if issubclass(obj, nn.Module) and obj.__module__ == archs.__name__ and obj not in found.values():
            found[name] = obj
    return found


def _traced(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module.eval(), example), str(path))


def _tinybeauty(path: Path, model: nn.Module, size: int) -> None:
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), preprocessing=Preprocessing(size=size)),
                  path)


def _bad_models(root: Path) -> list[str]:
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    nan, inf, big = small_tinybeauty(seed=2), small_tinybeauty(seed=3), small_tinybeauty(seed=4)
    with torch.no_grad():
        nan.out.conv.weight[0, 0, 0, 0] = float("nan")
        inf.out.conv.bias.fill_(float("inf"))
        for p in big.parameters():  # finite weights whose activations overflow float32
            p.mul_(1e30)
    torch.save(nan.state_dict(), root / "nan_weight.pt")
    _tinybeauty(root / "inf_bias.pt", inf, SIZE)
    _tinybeauty(root / "overflow.pt", big, SIZE)
    _traced(root / "nan_torchscript.pt", nan, x)
    _traced(root / "linear.pt", nn.Linear(10, 4), torch.rand(1, 10))
    _traced(root / "halves.pt", nn.Conv2d(3, 3, 3, stride=2, padding=1), x)
    _traced(root / "grey_in.pt", nn.Conv2d(1, 3, 3, padding=1), torch.rand(1, 1, SIZE, SIZE))
    return ["nan_weight.pt", "inf_bias.pt", "overflow.pt", "nan_torchscript.pt", "linear.pt", "halves.pt",
            "grey_in.pt"]


def _small_root(root: Path, size: int) -> Path:
    """A photo and a good second model (``good.pt``, at ``size``) for the commands that take them."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    _tinybeauty(root / "good.pt", small_tinybeauty(seed=1), size)
    return root


def _save_arch(cls: type, path: Path) -> bool:
    """The network (built with its defaults) as a tbopt artifact at SIZE; False if it needs arguments."""
    try:
        torch.manual_seed(0)
        module = cls().eval()
    except TypeError:
        return False
    save_artifact(Artifact(ArchSpec.custom(f"{archs.__name__}:{cls.__name__}", {}), module.state_dict(),
                           preprocessing=Preprocessing(size=SIZE)), path)
    return True


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(root with the networks and bad models, the NaN-on-faces checkpoint's own root, the networks by name)."""
    root = _small_root(tmp_path_factory.mktemp("nets"), SIZE)
    nan_root = _small_root(tmp_path_factory.mktemp("nan"), NAN_SIZE)
    save_nan_on_faces(nan_root / "nan_on_faces.pt", NAN_SIZE)
    built = {name: root / f"{name}.pt" for name, cls in arch_classes().items() if _save_arch(cls, root / f"{name}.pt")}
    _bad_models(root)
    return root, nan_root, built


def assert_no_failure_of_another_kind(result, what: str) -> None:
    """Success, or one ``Error:`` line (a ``Hint:`` at most); never an internal error, a traceback or a NaN figure."""
    text = result.stdout + result.stderr
    assert "internal error" not in text, (what, result.stderr)
    assert "Traceback" not in text, (what, text[-2000:])
    assert not NAN_FIGURE.search(result.stdout), (what, result.stdout)
    if result.exit_code != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, (what, result.exit_code, result.stderr)
        assert result.exit_code in (1, 2, 130), (what, result.exit_code, result.stderr)


def _run(args: list, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    return run(*args)


def test_the_corpus_of_networks_is_found():
    assert "NoConv" in arch_classes() and len(arch_classes()) >= 2


@pytest.mark.parametrize("command", COMMANDS)
def test_nan_on_faces_through_every_command(nets, command, tmp_path):
    _, nan_root, _ = nets
    r = _run(command_args(command, nan_root / "nan_on_faces.pt", nan_root, tmp_path), tmp_path)
    assert_no_failure_of_another_kind(r, command)
    if command != "info":
        assert r.exit_code == 1 and "NaN or Inf" in r.stderr, r.stderr


READERS = ("info", "bench")  # by default; the rest slow
WRITERS = ("apply", "compare", "prune", "quantize", "export", "run")


def _arch_params(commands, slow: bool):
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(name, command, marks=marks, id=f"{name}-{command}")
            for name in arch_classes() for command in commands]


@pytest.mark.parametrize("name, command", _arch_params(READERS, slow=False) + _arch_params(WRITERS, slow=True))
def test_every_network_through_every_command(nets, name, command, tmp_path):
    root, _, built = nets
    if name not in built:
        pytest.skip(f"tests.archs:{name} needs constructor arguments")
    r = _run(command_args(command, built[name], root, tmp_path), tmp_path)
    assert_no_failure_of_another_kind(r, f"{name} {command}")


BAD = ("nan_weight.pt", "inf_bias.pt", "overflow.pt", "nan_torchscript.pt", "linear.pt", "halves.pt", "grey_in.pt")


@pytest.mark.parametrize("model, command", [pytest.param(m, c, marks=[] if c == "bench" else [pytest.mark.slow],
                                                         id=f"{m}-{c}") for m in BAD for c in COMMANDS])
def test_every_bad_model_through_every_command(nets, model, command, tmp_path):
    root, _, _ = nets
    r = _run(command_args(command, root / model, root, tmp_path), tmp_path)
    assert_no_failure_of_another_kind(r, f"{model} {command}")
    assert r.exit_code != 0, r.stdout  # every one of them is refused


@pytest.mark.slow
@pytest.mark.parametrize("name", list(arch_classes()))
def test_a_small_search_on_a_network(nets, name, tmp_path):
    _, _, built = nets
    if name not in built:
        pytest.skip(f"tests.archs:{name} needs constructor arguments")
    r = _run(["optimize", built[name], "-o", tmp_path / "opt", "--limit", "2", "--time-budget", "1"], tmp_path)
    assert_no_failure_of_another_kind(r, f"{name} optimize")
