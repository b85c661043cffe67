"""Measure the figures the bench/compare/run issue asks for.

    python benchmarks/run_figures.py [--checkpoint tinybeauty_cli/core/assets/tinybeauty_demo.pt] [--skip-realdata]

1. ``tbopt run`` on the demo checkpoint, as a user runs it (default options): the whole run's wall
   time (<= 3 minutes on 2 cores) and where it goes, the size of ``TinyBeauty.mlmodel`` (< 100 KB),
   and every stage's PSNR against the targets of the built-in test set (within 0.3 dB of the
   original's).
2. ``tbopt bench`` of one float artifact on the 100 built-in images, scoring and timing: <= 30 s.
3. ``tbopt run`` on the released checkpoint with a folder holding face_01.png (no targets: fidelity).

With ``--baseline TREE`` (a checkout of another version, e.g. ``git worktree add ../before <commit>``),
it first times ``tbopt run`` on the demo from that tree and from this one, alternately for
``--rounds`` rounds, and prints each one's median wall time and their ratio: one run, the same load.

Each is the real command run in a subprocess, so the times include start-up and imports. The machine
is shared: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import REALDATA, ROOT, check, cpu_name, tbopt


def compare_with(baseline: Path, checkpoint: Path, rounds: int) -> None:
    """``tbopt run`` on the demo from ``baseline`` and from this tree, alternately; medians and ratio."""
    walls: dict[str, list[float]] = {"baseline": [], "this tree": []}
    tables: dict[str, str] = {}
    for r in range(rounds):
        for name, tree in (("baseline", baseline), ("this tree", ROOT)):
            with tempfile.TemporaryDirectory() as tmp:
                wall, res = tbopt("run", str(checkpoint), "--out", str(Path(tmp) / "o"), tree=tree)
            walls[name].append(wall)
            tables[name] = res.stdout
            print(f"   round {r + 1}: {name} ({tree}) tbopt run {wall:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    for name, table in tables.items():
        print(f"--- last table, {name}:\n{table}")
    print(f"0. tbopt run on {checkpoint.name}, {rounds} alternating rounds: baseline median {med['baseline']:.1f} s, "
          f"this tree {med['this tree']:.1f} s, ratio {med['this tree'] / med['baseline']:.2f} "
          f"(<= 0.6: {check(med['this tree'] / med['baseline'] <= 0.6)}); load average {os.getloadavg()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "tinybeauty_cli" / "core" / "assets" / "tinybeauty_demo.pt")
    ap.add_argument("--skip-realdata", action="store_true")
    ap.add_argument("--baseline", type=Path, help="another source tree to time tbopt run against, alternately")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --baseline")
    args = ap.parse_args()
    args.checkpoint = args.checkpoint.resolve()
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}; CPU: {cpu_name()}")
    if args.baseline is not None:
        compare_with(args.baseline.resolve(), args.checkpoint, args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "optimized_model"
        wall, res = tbopt("run", str(args.checkpoint), "--out", str(out))
        print(res.stdout)
        d = json.loads((out / "results.json").read_text())
        secs = d["seconds"]
        print(f"1. tbopt run on {args.checkpoint.name}: wall {wall:.1f} s (<= 180 s: {check(wall <= 180)}); "
              f"inside: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
        print(f"   prune's own parts: {d['prune']['seconds']}")
        print(f"   quantize's own parts: {d['quantize']['timings']}")
        mlmodel = d["checks"]["mlmodel_bytes"]
        print(f"   TinyBeauty.mlmodel {mlmodel:,} B (< 100 KB: {check(mlmodel < 100_000)})")
        drops = d["checks"].get("psnr_drop_db", {})
        worst = max(drops.values()) if drops else float("nan")
        print(f"   PSNR drop per stage vs the original {d['table'][0]['target_psnr_db']:.3f} dB: {drops} "
              f"(all <= 0.3 dB: {check(worst <= 0.3)})")

        wall, res = tbopt("bench", str(args.checkpoint), "--json")
        row = json.loads(res.stdout)["rows"][0]
        print(f"2. tbopt bench {args.checkpoint.name} on {row['images']} images (scoring + {row['timing_runs']} "
              f"timed runs): wall {wall:.1f} s (<= 30 s: {check(wall <= 30)}); PSNR {row['target_psnr_db']} dB, "
              f"p50 {row['latency_p50_ms']} ms at {row['threads']} threads")

        face = REALDATA / "face_01.png"
        ckpt = REALDATA / "tinybeauty_style1.pt"
        if args.skip_realdata or not (face.is_file() and ckpt.is_file()):
            print("3. skipped (no ../shared/realdata)")
        else:
            photos = tmp / "photos"
            photos.mkdir()
            os.symlink(face, photos / face.name)
            out = tmp / "real"
            wall, res = tbopt("run", str(ckpt), "--out", str(out), "--data", str(photos))
            print(res.stdout)
            d = json.loads((out / "results.json").read_text())
            fid = {row["stage"]: row["fidelity_psnr_db"] for row in d["table"][1:]}
            print(f"3. tbopt run on the released checkpoint, face_01.png: wall {wall:.1f} s; fidelity to the "
                  f"original (dB): {fid}; TinyBeauty.mlmodel {d['checks']['mlmodel_bytes']:,} B")
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
