"""Issue 12, class 7: repeatability.

The same command on the same inputs gives the same weights and the same Core ML layers and ops,
byte for byte. What may differ, and README says so: the time of each history step, measured
timings and latencies in metadata, and (``tbopt quantize --backend auto`` only) the engine, which
is chosen by timing.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tinybeauty_cli.cli.app import app
from tinybeauty_cli.coreml.spec import load_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent

#: Keys of measured times in metadata: they are measurements, not results.
TIMED = ("time", "seconds", "latency", "_ms", "_s", "timings", "measured_on")


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    return r


def untimed(obj):
    """``obj`` without the measured times and timestamps (see module docstring)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not any(t == k or k.endswith(t) for t in TIMED)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def twice(tmp_path: Path, name: str, *args) -> tuple[Path, Path]:
    """Run ``tbopt ARGS -o NAME`` twice, each time from its own folder: the same command line (it is
    recorded in the history), two outputs."""
    outs = []
    here = Path.cwd()
    try:
        for k in ("1", "2"):
            folder = tmp_path / k
            folder.mkdir()
            os.chdir(folder)
            run(*args, "-o", name)
            outs.append(folder / name)
    finally:
        os.chdir(here)
    return outs[0], outs[1]


@pytest.mark.parametrize("method, extra", [("magnitude", ()), ("global", ()),
                                           ("channel", ("--finetune-steps", "3"))])
def test_prune_gives_the_same_weights(small_artifact, tmp_path, method, extra):
    a, b = twice(tmp_path, "p.pt", "prune", small_artifact, "--rate", "0.3", "--method", method, *extra,
                 "--limit", "1", "--threads", "1", "--quiet")
    pa, pb = (torch.load(p, weights_only=True) for p in (a, b))
    assert pa["state_dict"].keys() == pb["state_dict"].keys()
    for k in pa["state_dict"]:
        assert torch.equal(pa["state_dict"][k], pb["state_dict"][k]), k
    assert untimed({k: v for k, v in pa.items() if k != "state_dict"}) == \
        untimed({k: v for k, v in pb.items() if k != "state_dict"})


def test_quantize_gives_the_same_int8_archive(small_artifact, tmp_path):
    # Two processes, as two runs of the command are: TorchScript numbers the classes it generates
    # (``___torch_mangle_N``) with a counter that lives as long as the Python process.
    a, b = tmp_path / "1" / "q.pt", tmp_path / "2" / "q.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for out in (a, b):  # the same command line (it is recorded in the history), in two folders
        out.parent.mkdir()
        subprocess.run([sys.executable, "-m", "tinybeauty_cli", "quantize", str(small_artifact), "--backend", "x86",
                        "--calib-count", "4", "--limit", "1", "--threads", "1", "--quiet", "-o", "q.pt"],
                       check=True, env=env, capture_output=True, cwd=out.parent)
    za, zb = zipfile.ZipFile(a), zipfile.ZipFile(b)
    names = [i.filename for i in za.infolist()]
    assert names == [i.filename for i in zb.infolist()]
    meta = [n for n in names if n.endswith("extra/tbopt.json")]
    assert len(meta) == 1
    for n in names:  # code, constants (the packed int8 weights), everything but the metadata: the same bytes
        if n not in meta:
            assert za.read(n) == zb.read(n), n
    ma, mb = (json.loads(z.read(meta[0])) for z in (za, zb))
    assert untimed(ma) == untimed(mb)


def _core_ml_parts(path: Path) -> tuple[bytes, dict, dict[str, bytes]]:
    """(the graph without its metadata, the metadata, every other file's bytes) of a Core ML file."""
    spec = load_spec(path)
    meta = dict(spec.description.metadata.userDefined)
    spec.description.metadata.userDefined.clear()
    files = {}
    if path.is_dir():
        files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
                 if p.is_file() and p.suffix not in (".mlmodel", ".json")}
    return spec.SerializeToString(deterministic=True), meta, files


def export_and_rebuild_by_its_command(tmp_path: Path, args: list[str], name: str) -> tuple[Path, dict]:
    """``tbopt export *args -o name --json`` in one folder, then the command the file records in another;
    asserts both files have the same graph, weight files and metadata (the history untimed). Returns the
    first file and its JSON."""
    here = os.getcwd()
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    try:
        os.chdir(first)
        r = runner.invoke(app, ["export", *args, "-o", name, "--json"])
        assert r.exit_code == 0, r.stderr
        made = json.loads(r.stdout)
        assert made["command"].startswith("tbopt export ")
        os.chdir(second)
        r = runner.invoke(app, shlex.split(made["command"])[1:] + ["--quiet"])
        assert r.exit_code == 0, r.stderr
    finally:
        os.chdir(here)
    ga, ma, fa = _core_ml_parts(first / name)
    gb, mb, fb = _core_ml_parts(second / name)
    assert ga == gb and fa == fb  # the ops, their bits and the weight file
    history = "tbopt.history"
    assert {k: v for k, v in ma.items() if k != history} == {k: v for k, v in mb.items() if k != history}
    assert untimed(json.loads(ma[history])) == untimed(json.loads(mb[history]))
    return first / name, made


@pytest.mark.parametrize("output, weights", [("m.mlmodel", "int8"), ("m.mlmodel", "pal4"),
                                             ("m.mlpackage", "fp16"), ("m.mlpackage", "pal4")])
def test_export_gives_the_same_layers_ops_and_weights(small_artifact, tmp_path, output, weights):
    a, b = twice(tmp_path, output, "export", small_artifact, "--weights", weights, "--quiet")
    ga, ma, fa = _core_ml_parts(a)
    gb, mb, fb = _core_ml_parts(b)
    assert ga == gb  # layers / ops, their order and names, the weights stored in the graph
    assert fa == fb  # weight.bin of a package
    history = "tbopt.history"
    assert {k: v for k, v in ma.items() if k != history} == {k: v for k, v in mb.items() if k != history}
    assert untimed(json.loads(ma[history])) == untimed(json.loads(mb[history]))
    if a.is_dir():  # the package's manifest: the same items, under identifiers coremltools draws at random
        man_a, man_b = (json.loads((p / "Manifest.json").read_text()) for p in (a, b))
        assert sorted(v["path"] for v in man_a["itemInfoEntries"].values()) == \
            sorted(v["path"] for v in man_b["itemInfoEntries"].values())
