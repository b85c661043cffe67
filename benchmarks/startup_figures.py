"""Start-up time of the CLI: ``tbopt --help`` and ``tbopt CMD --help`` for every registered command.

Each is run as a fresh subprocess: one untimed warm-up (fills the OS file cache), then N timed runs;
the table shows the median and the fastest, and which heavy modules the command imported (one
more run under ``python -X importtime``). The target is a median <= 1.0 s on an idle 2-core machine
with no torch or coremltools imported; the load average is printed because a busy machine is slower.

    python benchmarks/startup_figures.py [--runs 5] [--tbopt PATH]

By default the CLI of this source tree runs as ``python -m tinybeauty_cli``; ``--tbopt`` times an
installed console script instead (the heavy-module column then still comes from this tree).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, cpu_name
#: The source tree whose CLI is timed (``--tree``; this checkout by default).
TREE = ROOT

HEAVY = ("torch", "coremltools", "numpy", "PIL", "matplotlib", "sklearn", "torch_pruning")


def command_names() -> list[str]:
    import typer.main  # noqa: PLC0415 - after sys.path points at this tree

    from tinybeauty_cli.cli.app import app  # noqa: PLC0415

    return sorted(typer.main.get_command(app).commands)


def _env() -> dict[str, str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TREE), env.get("PYTHONPATH")) if p)
    return env


def wall_times(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, env=_env(), check=True, cwd=TREE)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=_env(), check=True, cwd=TREE)
        times.append(time.perf_counter() - t0)
    return times


def heavy_imports(args: list[str]) -> list[str]:
    """Top-level heavy packages ``python -X importtime -m tinybeauty_cli ARGS`` imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinybeauty_cli", *args],
                          capture_output=True, text=True, env=_env(), check=True, cwd=TREE)
    roots = {line.rsplit("|", 1)[-1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in roots]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command (after 1 warm-up)")
    ap.add_argument("--tbopt", help="time this installed tbopt executable instead of python -m tinybeauty_cli")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the source tree to time, e.g. an older checkout")
    args = ap.parse_args()
    global TREE
    TREE = args.tree.resolve()
    sys.path.insert(0, str(TREE))
    base = [args.tbopt] if args.tbopt else [sys.executable, "-m", "tinybeauty_cli"]

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores)")
    print(f"Python {platform.python_version()}; tree {TREE}; timed: {' '.join(base)}; median and min of {args.runs} runs "
          f"after 1 warm-up" + (f"; load average before {load[0]:.2f}" if load else ""))
    rows = []
    for name in [None, *command_names()]:
        cli_args = ([name] if name else []) + ["--help"]
        times = wall_times(base + cli_args, args.runs)
        rows.append((" ".join(["tbopt", *cli_args]), statistics.median(times), min(times), heavy_imports(cli_args)))
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'median (s)':>10}  {'min (s)':>8}  heavy modules imported")
    for label, median, fastest, heavy in rows:
        print(f"{label:<{width}}  {median:>10.3f}  {fastest:>8.3f}  {', '.join(heavy) or 'none'}")
    worst = max(r[1] for r in rows)
    print(f"slowest median {worst:.3f} s; torch or coremltools imported by: "
          + (", ".join(r[0] for r in rows if {"torch", "coremltools"} & set(r[3])) or "none"))


if __name__ == "__main__":
    main()
