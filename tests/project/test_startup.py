"""``tbopt --help`` starts fast: building the help of the app and of every command imports neither
torch nor coremltools (each costs seconds of start-up). Checked in a fresh interpreter, since the
test process itself has imported torch long before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

HEAVY = ("torch", "coremltools")

# Runs in a fresh interpreter: the help of the app and of every registered command, then what got imported.
PROBE = """
import json, sys
import typer.main
from typer.testing import CliRunner
from tinybeauty_cli.cli.app import app

names = sorted(typer.main.get_command(app).commands)
runner = CliRunner()
results = {}
for args in [["--help"]] + [[name, "--help"] for name in names]:
    r = runner.invoke(app, args)
    results[" ".join(args)] = {"exit_code": r.exit_code, "usage": "Usage" in r.output}
print(json.dumps({"commands": names, "results": results,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_help_of_every_command_imports_neither_torch_nor_coremltools():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "info" in report["commands"], report["commands"]
    assert len(report["results"]) == len(report["commands"]) + 1
    for args, r in report["results"].items():
        assert r == {"exit_code": 0, "usage": True}, (args, r)
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


def test_python_m_help_and_version_without_torch():
    """``python -m tinybeauty_cli`` works, and its --help imports no heavy module (seen by -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinybeauty_cli", "--help"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "info" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "tinybeauty_cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    proc = subprocess.run([sys.executable, "-m", "tinybeauty_cli", "--version"], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("tbopt "), proc.stderr
