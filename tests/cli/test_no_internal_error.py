"""Issue 20, class 8: a net under every class -- no command, on any input of the corpora, prints
``internal error``, a traceback, or ``nan``/``inf`` where a figure belongs.

The corpora: the bad and odd inputs of ``tests/test_bad_inputs.py`` (its corpus and command lines),
the checkpoint that is finite on the probe image but NaN on faces (``nonfinite_model``), and every
network class defined in ``tests/archs.py`` (found there when the test runs, so that networks added
to it are covered without a change here). A command may succeed or refuse with one line; it may not
fail any other way.

Default run: the NaN checkpoint through every command, and each network through the commands that
only read it (small: 32 px). The whole cross product is slow.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core.artifact import Artifact, ArchSpec, Preprocessing, save_artifact

from .. import archs
from ..conftest import small_tinybeauty
from ..test_bad_inputs import BROKEN, COMMANDS, GOOD, NOT_IMAGE_MODELS, command_args, corpus  # noqa: F401 - a fixture
from .nonfinite_model import NAN_FIGURE, save_nan_on_faces

SIZE = 32
NAN_SIZE = 64
cli = CliRunner()


def arch_classes() -> list[str]:
    """Every nn.Module subclass ``tests/archs.py`` defines, by name."""
    return sorted(name for name, obj in inspect.getmembers(archs, inspect.isclass)
                  if issubclass(obj, nn.Module) and obj.__module__ == archs.__name__)


def _save_arch(name: str, path: Path) -> bool:
    """The network ``name`` (built with its defaults) saved as a tbopt artifact at SIZE; False if it needs arguments."""
    try:
        torch.manual_seed(0)
        module = getattr(archs, name)().eval()
    except TypeError:
        return False
    save_artifact(Artifact(ArchSpec.custom(f"tests.archs:{name}", {}), module.state_dict(),
                           preprocessing=Preprocessing(size=SIZE)), path)
    return True


def _small_root(root: Path, size: int) -> Path:
    """What ``command_args`` takes from the bad-input corpus for a good model's commands: a photo and a
    second model (``good.pt``, at ``size``), without building that corpus (its Core ML files take a while)."""
    (root / "odd").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)).save(root / "odd" / "rgb.png")
    good = small_tinybeauty(seed=1)
    save_artifact(Artifact.for_tinybeauty(good.config, good.state_dict(), preprocessing=Preprocessing(size=size)),
                  root / "good.pt")
    return root


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(root, the NaN-on-faces checkpoint's own small root, each network of tests/archs.py by name)."""
    root = _small_root(tmp_path_factory.mktemp("nets"), SIZE)
    nan_root = _small_root(tmp_path_factory.mktemp("nan"), NAN_SIZE)
    save_nan_on_faces(nan_root / "nan_on_faces.pt", NAN_SIZE)  # at 32 px no scaling separates probe and faces
    built = {name: root / f"{name}.pt" for name in arch_classes() if _save_arch(name, root / f"{name}.pt")}
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
    return cli.invoke(app, [str(a) for a in args])


def test_the_corpus_of_networks_is_found():
    assert "TinyUNet" in arch_classes()


@pytest.mark.parametrize("command", COMMANDS)
def test_nan_on_faces_through_every_command(nets, command, tmp_path):
    _, nan_root, _ = nets
    r = _run(command_args(command, nan_root / "nan_on_faces.pt", nan_root, tmp_path), tmp_path)
    assert_no_failure_of_another_kind(r, command)
    if command != "info":
        assert r.exit_code == 1 and "NaN or Inf" in r.stderr, r.stderr


READERS = ("info", "bench", "apply", "compare")
WRITERS = ("prune", "quantize", "export", "run")


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


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model", BROKEN + NOT_IMAGE_MODELS + GOOD)
def test_every_corpus_model_through_every_command(corpus, model, command, tmp_path):  # noqa: F811
    r = _run(command_args(command, corpus["root"] / model, corpus["root"], tmp_path), tmp_path)
    assert_no_failure_of_another_kind(r, f"{model} {command}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TinyUNet"])
def test_a_small_search_on_a_network(nets, name, tmp_path):
    _, _, built = nets
    r = _run(["optimize", built[name], "-o", tmp_path / "opt", "--limit", "2", "--time-budget", "1"], tmp_path)
    assert_no_failure_of_another_kind(r, f"{name} optimize")
