"""The same command on the same inputs gives the same weights and the same Core ML layers and ops,
byte for byte. What may differ, and README says so: the time of each history step, measured
timings and latencies in metadata, and (``tbopt quantize --backend auto`` only) the engine, which
is chosen by timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, core_ml_parts, run_ok, untimed


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
            run_ok(*args, "-o", name)
            outs.append(folder / name)
    finally:
        os.chdir(here)
    return outs[0], outs[1]


@pytest.mark.parametrize("method, extra", [("magnitude", ()), ("global", ()),
                                           pytest.param("channel", ("--finetune-steps", "3"), marks=pytest.mark.slow)])
def test_prune_gives_the_same_weights(small_artifact, tmp_path, method, extra):
    a, b = twice(tmp_path, "p.pt", "prune", small_artifact, "--rate", "0.3", "--method", method, *extra,
                 "--limit", "1", "--threads", "1", "--quiet")
    pa, pb = (torch.load(p, weights_only=True) for p in (a, b))
    assert pa["state_dict"].keys() == pb["state_dict"].keys()
    for k in pa["state_dict"]:
        assert torch.equal(pa["state_dict"][k], pb["state_dict"][k]), k
    assert untimed({k: v for k, v in pa.items() if k != "state_dict"}) == \
        untimed({k: v for k, v in pb.items() if k != "state_dict"})


@pytest.mark.slow  # 10-50 s: the default run keeps under 10 minutes on 2 cores
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


@pytest.mark.parametrize("output, weights", [("m.mlmodel", "int8"), ("m.mlmodel", "pal4"),
                                             ("m.mlpackage", "fp16"), ("m.mlpackage", "pal4")])
def test_export_gives_the_same_layers_ops_and_weights(small_artifact, tmp_path, output, weights):
    a, b = twice(tmp_path, output, "export", small_artifact, "--weights", weights, "--quiet")
    ga, ma, fa = core_ml_parts(a)
    gb, mb, fb = core_ml_parts(b)
    assert ga == gb  # layers / ops, their order and names, the weights stored in the graph
    assert fa == fb  # weight.bin of a package
    history = "tbopt.history"
    assert {k: v for k, v in ma.items() if k != history} == {k: v for k, v in mb.items() if k != history}
    assert untimed(json.loads(ma[history])) == untimed(json.loads(mb[history]))
    if a.is_dir():  # the package's manifest: the same items, under identifiers coremltools draws at random
        man_a, man_b = (json.loads((p / "Manifest.json").read_text()) for p in (a, b))
        assert sorted(v["path"] for v in man_a["itemInfoEntries"].values()) == \
            sorted(v["path"] for v in man_b["itemInfoEntries"].values())
