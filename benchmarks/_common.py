"""What the benchmark scripts share: where the project and the released checkpoint are, the CPU and
load to print beside every figure, tbopt run in a subprocess, and a verdict word.

Importing it puts the project's root first on ``sys.path``, so a script run as
``python benchmarks/NAME.py`` imports this tree's ``tinybeauty_cli``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
#: The released checkpoint and a real face (a git worktree sits one level deeper: TBOPT_REALDATA).
REALDATA = Path(os.environ.get("TBOPT_REALDATA") or ROOT.parent / "shared" / "realdata")


def load_note() -> str:
    """The load average to print beside a timing: a busy machine is slower."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def check(ok: bool) -> str:
    """The word a benchmark prints beside a target it met or missed."""
    return "PASS" if ok else "FAIL"


def tbopt(*args: str, tree: Path = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    """``tbopt ARGS`` from the source tree ``tree`` (this one by default) in a subprocess: (wall seconds,
    the finished process). Exits with tbopt's error if it fails."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tinybeauty_cli", *args], capture_output=True, text=True, env=env,
                         cwd=tree)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"tbopt {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return seconds, res
