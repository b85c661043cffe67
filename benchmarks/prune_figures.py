"""Measure tbopt prune's figures against its targets, as ratios measured in one run.

    python benchmarks/prune_figures.py [--checkpoint tinybeauty_cli/core/assets/tinybeauty_demo.pt] [--steps 150]

1. ``magnitude --rate 0.3`` on the demo checkpoint: per-layer sparsity (30% +-1%), zipped size
   (<= 80% of the original's), PSNR against the targets of the built-in test set (drop <= 0.2 dB).
2. ``channel --rate 0.3 --finetune-steps N``: MACs (<= 55%), CPU latency at batch 1, 256x256, same
   threads, original and pruned timed in alternating rounds (<= 0.65x), PSNR drop (<= 0.3 dB),
   fine-tuning time (< 10 min).
3. Recovery of ``channel --rate 0.3``: PSNR drop and wall time (drawing the images, prune + refit,
   fine-tuning, per step) of the default number of steps beside ``--compare-steps`` (default 300); asked: <= 0.3 dB
   within 90 s on 2 idle cores.
4. ``channel --rate 0.3`` on the released checkpoint: its fidelity on the real photo face_01.png.

Every figure is measured here; the machine is shared, so the load average is printed at the start
and the end (re-run when it is high: latency ratios suffer most).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REALDATA, check, load_note

from tinybeauty_cli.core.checkpoint import load_model  # noqa: E402
from tinybeauty_cli.core.contexts import torch_threads
from tinybeauty_cli.core.paths import demo_checkpoint  # noqa: E402
from tinybeauty_cli.flow.prune import prune_file  # noqa: E402
from tinybeauty_cli.prune.config import PruneConfig  # noqa: E402
from tinybeauty_cli.runtime.timing import measure_latency  # noqa: E402



def interleaved_latency(modules: dict[str, torch.nn.Module], threads: int, rounds: int, runs: int) -> dict[str, float]:
    """Median over rounds of each module's median latency (ms); modules alternate within each round."""
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    per: dict[str, list[float]] = {k: [] for k in modules}
    for _ in range(rounds):
        for name, m in modules.items():
            m.eval()
            with torch.inference_mode():
                lat = measure_latency(lambda: m(x), runs=runs, warmup=3, threads=threads)
            per[name].append(lat.p50_ms)
    return {k: statistics.median(v) for k, v in per.items()}


def recipe_run(ckpt: Path, cfg: PruneConfig, work: Path, args: argparse.Namespace):
    return prune_file(ckpt, cfg, output=work / f"recovery_{cfg.steps}.pt", eval_limit=args.limit,
                      threads=args.threads, force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the demo checkpoint")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps for channel pruning (default: tbopt's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per round")
    ap.add_argument("--limit", type=int, default=None, help="test-set images (default: all 100)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--compare-steps", default="300",
                    help="fine-tuning steps to compare the default with (comma-separated; '' for none)")
    args = ap.parse_args()
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    ckpt = args.checkpoint or demo_checkpoint()
    print(f"tbopt prune figures on {ckpt}; {args.threads} threads; {load_note()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="prune-figures-"))
    t_all = time.perf_counter()

    # 1. magnitude 0.3
    r = prune_file(ckpt, PruneConfig(rate=0.3), output=work / "magnitude.pt", eval_limit=args.limit, threads=args.threads)
    sp = [layer.sparsity for layer in r.layers]
    q = r.quality
    drop = q["target_psnr_before_db"] - q["target_psnr_after_db"]
    zipped = r.ratios()["zipped_bytes"]
    print("\n== magnitude --rate 0.3 ==")
    print(f"per-layer sparsity: min {min(sp):.2%}, max {max(sp):.2%} over {len(sp)} layers  "
          f"[30% +-1%: {check(all(abs(s - 0.3) <= 0.01 for s in sp))}]")
    print(f"size on disk: {r.before.size_bytes:,} -> {r.after.size_bytes:,} B (x{r.ratios()['size_bytes']:.3f}, "
          f"zeros are stored densely)")
    print(f"zipped: {r.before.zipped_bytes:,} -> {r.after.zipped_bytes:,} B = {zipped:.3f} of the original  "
          f"[<= 0.80: {check(zipped <= 0.80)}]")
    print(f"MACs (dense): x{r.ratios()['macs']:.3f}; non-zero parameters x{r.ratios()['nonzero_parameters']:.3f}")
    print(f"PSNR vs targets ({q['images']}): {q['target_psnr_before_db']:.3f} -> {q['target_psnr_after_db']:.3f} dB, "
          f"drop {drop:.3f} dB  [<= 0.2: {check(drop <= 0.2)}]; fidelity {q['fidelity_psnr_db']:.2f} dB")
    print(f"time: {r.seconds}")

    # 2. channel 0.3 + fine-tuning
    cfg = PruneConfig(rate=0.3, method="channel", finetune_steps=args.steps)
    r = prune_file(ckpt, cfg, output=work / "channel.pt", eval_limit=args.limit, threads=args.threads)
    default_report = r
    q = r.quality
    drop = q["target_psnr_before_db"] - q["target_psnr_after_db"]
    macs = r.ratios()["macs"]
    original = load_model(ckpt).module
    pruned = load_model(work / "channel.pt").module
    lat = interleaved_latency({"original": original, "pruned": pruned}, args.threads, args.rounds, args.runs)
    lat_ratio = lat["pruned"] / lat["original"]
    ft_s = r.seconds.get("finetune", 0.0)
    print(f"\n== channel --rate 0.3 --finetune-steps {cfg.steps} ==")
    widths = sorted({(g.channels_before, g.channels_after) for g in r.groups})
    print(f"groups: {len(r.groups)} ({', '.join(f'{b}->{a}' for b, a in widths)} channels)")
    print(f"parameters: {r.before.parameters:,} -> {r.after.parameters:,} (x{r.ratios()['parameters']:.3f})")
    print(f"MACs: {r.before.macs / 1e9:.3f} -> {r.after.macs / 1e9:.3f} G = {macs:.3f} of the original  "
          f"[<= 0.55: {check(macs <= 0.55)}]")
    print(f"latency (batch 1, 256x256, {args.threads} threads, PyTorch eager, median of {args.rounds} alternating "
          f"rounds of {args.runs} runs): {lat['original']:.1f} -> {lat['pruned']:.1f} ms = {lat_ratio:.3f}x  "
          f"[<= 0.65: {check(lat_ratio <= 0.65)}]")
    print(f"size zipped: x{r.ratios()['zipped_bytes']:.3f}")
    print(f"PSNR vs targets: {q['target_psnr_before_db']:.3f} -> pruned {q.get('target_psnr_pruned_only_db')} -> "
          f"fine-tuned {q['target_psnr_after_db']:.3f} dB, drop {drop:.3f} dB  [<= 0.3: {check(drop <= 0.3)}]")
    print(f"fidelity to the input: {q.get('fidelity_pruned_only_db')} dB before fine-tuning, "
          f"{q['fidelity_psnr_db']:.2f} dB after")
    print(f"fine-tuning: {r.finetune['steps']} steps in {ft_s:.0f} s ({ft_s / max(1, r.finetune['steps']):.2f} s/step) "
          f"[< 600 s: {check(ft_s < 600)}]; {r.finetune['loss']} {r.finetune['first_loss']} -> {r.finetune['last_loss']}")
    print(f"time: {r.seconds}")

    # 3. recovery: the default beside shorter fine-tuning
    print(f"\n== recovery of channel --rate 0.3 ({load_note()}) ==")
    print(f"{'steps':>5s} {'drop dB':>8s} {'images s':>8s} {'prune+refit s':>13s} {'fine-tune s':>11s} {'s/step':>7s} "
          f"{'recovery s':>10s}")
    recipes = [cfg] + [PruneConfig(rate=0.3, method="channel", finetune_steps=int(n))
                       for n in args.compare_steps.split(",") if n]
    for recipe in recipes:
        r = default_report if recipe is cfg else recipe_run(ckpt, recipe, work, args)
        q, sec = r.quality, r.seconds
        drop = q["target_psnr_before_db"] - q["target_psnr_after_db"]
        ft = sec.get("finetune", 0.0)
        recovery = sec.get("images", 0.0) + sec.get("prune", 0.0) + ft  # drawing the images, ranking, refit, distillation
        asked = f"[<= 0.3 dB: {check(drop <= 0.3)}; <= 90 s: {check(recovery <= 90)}]"
        print(f"{recipe.steps:5d} {drop:8.3f} {sec.get('images', 0.0):8.1f} {sec.get('prune', 0.0):13.1f} {ft:11.1f} "
              f"{ft / max(1, recipe.steps):7.3f} {recovery:10.1f} {asked}{' (default)' if recipe is cfg else ''}",
              flush=True)
    print(f"({load_note()})")

    # 4. the released checkpoint, scored on the real photo
    real = REALDATA / "tinybeauty_style1.pt"
    if not args.skip_real and real.is_file():
        print("\n== channel --rate 0.3 on the released checkpoint, fidelity on face_01.png ==")
        for steps in (0, cfg.steps):
            r = prune_file(real, PruneConfig(rate=0.3, method="channel", finetune_steps=steps),
                      output=work / f"real_{steps}.pt", eval_data=REALDATA, threads=args.threads)
            print(f"finetune steps {steps}: MACs x{r.ratios()['macs']:.3f}, parameters {r.after.parameters:,}, "
                  f"fidelity on {r.quality['images']}: {r.quality['fidelity_psnr_db']:.2f} dB; time {r.seconds}")
    print(f"\nwhole run {time.perf_counter() - t_all:.0f} s; {load_note()}; outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
