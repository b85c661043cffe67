"""tbopt export's weight storage: int8 by default (as tbopt run's .mlmodel), ``--fp16`` fp16 weights
(about twice the bytes), ``--fp32`` fp32 weights and compute, ``--weights`` over all of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinybeauty_cli.export.config import DEFAULT_WEIGHTS, ExportConfig
from tinybeauty_cli.flow.optimize_config import OptimizeConfig, Recipe

from tests.helpers import EXPORT_SIZE as SIZE, assert_one_line_error, export_and_rebuild_by_its_command, run, run_ok


def _export(src: Path, out: Path, *options) -> dict:
    return json.loads(run_ok("export", src, "-o", out, "--size", SIZE, "--threads", "1", "--json", "-q",
                             *options).stdout)


def _stored(path: Path) -> str:
    """How ``tbopt info`` reads the file's conv weights (e.g. "8-bit linear x5, fp16 x12")."""
    return json.loads(run_ok("info", path, "--json").stdout)["coreml_weights"]


def test_plain_export_stores_int8_and_fp16_fp32_are_what_they_say(tmp_path, small_artifact):
    plain, fp16, fp32 = (_export(small_artifact, tmp_path / f"{name}.mlmodel", *opts)
                         for name, opts in (("plain", ()), ("fp16", ("--fp16",)), ("fp32", ("--fp32",))))
    assert DEFAULT_WEIGHTS == "int8"
    assert plain["weights"].startswith("int8") and plain["precision"] == "fp16"
    assert "8-bit linear" in _stored(tmp_path / "plain.mlmodel")
    assert fp16["weights"] == "fp16" and "8-bit" not in _stored(tmp_path / "fp16.mlmodel")
    assert fp32["weights"] == fp32["precision"] == "fp32"
    assert "fp16" not in _stored(tmp_path / "fp32.mlmodel") and "8-bit" not in _stored(tmp_path / "fp32.mlmodel")
    # bytes of conv weights: 1, 2 and 4 per value (int8 adds a scale per output channel)
    assert 1.6 <= fp16["weight_bytes"] / plain["weight_bytes"] <= 2.05, (fp16["weight_bytes"], plain["weight_bytes"])
    assert 1.9 <= fp32["weight_bytes"] / fp16["weight_bytes"] <= 2.05
    assert fp16["size_bytes"] > 1.5 * plain["size_bytes"]
    # each file's rebuild command says what it stored, so it still writes the same file under this default
    assert "--weights int8" in plain["command"]
    assert "--fp16" in fp16["command"] and "--weights" not in fp16["command"]
    assert "--fp32" in fp32["command"]


def test_fp16_file_is_rebuilt_by_its_command(tmp_path, small_artifact):
    _, made = export_and_rebuild_by_its_command(tmp_path, [small_artifact, "--fp16", "--size", str(SIZE)],
                                                "m.mlmodel")
    assert made["weights"] == "fp16"


def test_ml_program_default_and_precision_with_weights(tmp_path, small_artifact):
    plain = _export(small_artifact, tmp_path / "plain.mlpackage")
    assert plain["weights"].startswith("int8") and plain["precision"] == "fp16" and plain["target"] == "iOS16"
    # --fp32 with --weights: int8 storage, fp32 compute
    w8_fp32 = _export(small_artifact, tmp_path / "w8.mlpackage", "--fp32", "--weights", "int8")
    assert w8_fp32["weights"].startswith("int8") and w8_fp32["precision"] == "fp32"
    # --fp16 with --weights names the compute precision, which is fp16 anyway: the same configuration
    assert (ExportConfig(format="mlprogram", precision="fp16", weights="pal4").command_line()
            == "tbopt export --weights pal4")


def test_an_ios15_ml_program_needs_fp16_weights_and_says_so(tmp_path, small_artifact):
    r = run("export", small_artifact, "-o", tmp_path / "m.mlpackage", "--target", "iOS15", "--size", SIZE)
    assert_one_line_error(r, "requires iOS16", code=2)
    assert "--fp16" in r.stderr
    assert not (tmp_path / "m.mlpackage").exists()
    d = _export(small_artifact, tmp_path / "m.mlpackage", "--fp16", "--target", "iOS15")
    assert d["target"] == "iOS15" and d["weights"] == "fp16"


def test_help_shows_the_true_default():
    r = run("export", "--help")
    text = " ".join(r.stdout.replace("│", " ").split())
    assert not re.search(r"default: (fp16|True|--fp16)", text, re.I), text
    assert "Default: int8 weights, fp16 compute" in text


def test_config_command_line_says_fp16_when_it_stores_fp16():
    assert ExportConfig().command_line("m.pt") == "tbopt export m.pt --fp16"
    assert ExportConfig(precision="fp32").command_line("m.pt") == "tbopt export m.pt --fp32"
    assert ExportConfig(weights="int8").command_line("m.pt") == "tbopt export m.pt --weights int8"
    assert (ExportConfig(format="mlprogram", precision="fp32", weights="int8").command_line("m.pt")
            == "tbopt export m.pt --fp32 --weights int8")


@pytest.mark.parametrize("weights", ["fp16", "int8", "pal4"])
def test_optimize_recipes_name_their_storage(weights):
    line = Recipe(target="ios16", weights=weights).commands("m.pt", "o.mlpackage", OptimizeConfig(), 1)[-1]
    assert f"--weights {weights}" in line
