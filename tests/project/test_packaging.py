"""A non-editable install carries the demo checkpoint (package data) and runs from any folder.

The wheel is built from a copy of the project (pyproject.toml, README.md, tinybeauty_cli/), so that
setuptools' ``build/`` and ``*.egg-info`` land in the copy, never in the source tree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

DEMO_IN_PACKAGE = "tinybeauty_cli/core/assets/tinybeauty_demo.pt"
DEMO_PARAMETERS = 85_227


def _copy_project(dest: Path) -> Path:
    """The files a build needs, without caches: what an sdist would hold."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "tinybeauty_cli", dest / "tinybeauty_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    """No path to the source tree and no demo override: the install must stand on its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TBOPT_DEMO_CHECKPOINT", "PYTHONHOME")}
    env.update(NO_COLOR="1", COLUMNS="200", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not importable: cannot build the wheel without build isolation")
    # setuptools >= 70.1 writes wheels itself; older ones need the wheel package.
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and importlib.util.find_spec("wheel") is None:
        pytest.skip("neither wheel nor a setuptools with bdist_wheel is importable: cannot build the wheel")
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = _copy_project(tmp / "src"), tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                           "-w", str(dist)], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("tbopt-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_demo_checkpoint(wheel):
    with zipfile.ZipFile(wheel) as zf:
        assert DEMO_IN_PACKAGE in zf.namelist()
        packed = zf.read(DEMO_IN_PACKAGE)
    source = (ROOT / DEMO_IN_PACKAGE).read_bytes()
    assert hashlib.sha256(packed).hexdigest() == hashlib.sha256(source).hexdigest()


def test_installed_wheel_describes_the_demo_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / DEMO_IN_PACKAGE).is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tinybeauty_cli", "info", "--json"], cwd=elsewhere,
                          env=_clean_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["parameters"] == DEMO_PARAMETERS
    assert Path(d["path"]).resolve() == (site / DEMO_IN_PACKAGE).resolve()  # the installed copy, not the source


@pytest.mark.slow
def test_fresh_venv_install_runs_tbopt_info(tmp_path):
    """A new virtual environment, ``pip install torch==2.13.0 <project>`` (not editable), then ``tbopt info``."""
    t0 = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, tbopt = venv / "bin" / "python", venv / "bin" / "tbopt"
    project = _copy_project(tmp_path / "project")
    # torch pinned: 2.13.0 is what the project is measured on (and the copy on local disk).
    proc = subprocess.run([str(python), "-m", "pip", "install", "torch==2.13.0", str(project)],
                          env=_clean_env(), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    installed = time.perf_counter() - t0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([str(tbopt), "info"], cwd=elsewhere, env=_clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{DEMO_PARAMETERS:,}" in proc.stdout and "tinybeauty_demo.pt" in proc.stdout, proc.stdout
    proc = subprocess.run([str(tbopt), "info", "--json"], cwd=elsewhere, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["parameters"] == DEMO_PARAMETERS
    assert Path(d["path"]).resolve().is_relative_to(venv.resolve())  # the demo came from the venv's site-packages
    print(f"fresh venv: install {installed:.0f} s, total {time.perf_counter() - t0:.0f} s")
