"""Train the demo checkpoint shipped in assets/ (reproducible: fixed seeds).

    python scripts/train_demo.py --out tinybeauty_cli/core/assets/tinybeauty_demo.pt

Trains a TinyBeauty in the released layout (width 24, 2+2 residual blocks) on
synthetic (bare, made-up) portrait pairs drawn with seed ``TRAIN_SEED`` -- never the
built-in test set's seed -- on random 128x128 crops of the 256x256 portraits (about 8x
cheaper per image than whole portraits, and it generalises to them; an optional
second phase trains on whole portraits), then a short last phase with an L1 penalty on the
conv weights, as a stage-4 run that plans for pruning does. Prints the PSNR on
the built-in 100-pair test set and the do-nothing baseline, and records both in the
artifact's history. About 20 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tinybeauty_cli.core import synthetic
from tinybeauty_cli.core.images import builtin_test_set
from tinybeauty_cli.core.model import TinyBeauty, TinyBeautyConfig
from tinybeauty_cli.core.training import FitConfig, fit
from tinybeauty_cli.measure.evaluate import evaluate
from tinybeauty_cli.runtime.runners import TorchRunner


def to_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def make_batch_fn(bare: torch.Tensor, made: torch.Tensor, batch: int, crop: int | None):
    n, _, h, w = bare.shape

    def batch_fn(step: int, gen: torch.Generator):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x, y = bare[idx], made[idx]
        if crop is not None:
            top = torch.randint(0, h - crop + 1, (batch,), generator=gen)
            left = torch.randint(0, w - crop + 1, (batch,), generator=gen)
            x = torch.stack([x[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])
            y = torch.stack([y[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        y[flip] = y[flip].flip(-1)
        return x, y

    return batch_fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tinybeauty_cli/core/assets/tinybeauty_demo.pt"))
    ap.add_argument("--work-dir", type=Path, default=Path(".train_demo"))
    ap.add_argument("--pairs", type=int, default=1200)
    ap.add_argument("--crop-steps", type=int, default=1500)
    ap.add_argument("--full-steps", type=int, default=0,
                    help="optional second phase on whole 256x256 portraits (crop training alone "
                         "already generalises to whole images)")
    ap.add_argument("--l1-steps", type=int, default=300,
                    help="last phase: crops with an L1 penalty on the conv weights (see --l1)")
    ap.add_argument("--l1", type=float, default=3e-5,
                    help="strength of that penalty: weights that matter little go to zero, so that 30%% "
                         "magnitude pruning costs <0.2 dB (without it ~2 dB, 1.25 dB from the out conv alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--package-only", action="store_true",
                    help="skip training; evaluate and package the weights in --work-dir")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    weights = args.work_dir / "final_state_dict.pt"
    t0 = time.perf_counter()

    model = TinyBeauty(TinyBeautyConfig.uniform(24, 2))
    if not args.package_only:
        print(f"generating {args.pairs} training pairs (seed {synthetic.TRAIN_SEED})", flush=True)
        bare_u8, made_u8 = synthetic.portraits(synthetic.TRAIN_SEED, args.pairs, 256)
        bare, made = to_tensor(bare_u8), to_tensor(made_u8)
        del bare_u8, made_u8

        def log(phase: str):
            def on_step(step: int, loss: float) -> None:
                if step % 100 == 0:
                    print(f"[{phase}] step {step:5d} loss {loss:.5f} ({time.perf_counter() - t0:.0f}s)", flush=True)
                if step % 250 == 249:  # a snapshot to inspect while a long run goes on
                    torch.save(model.state_dict(), args.work_dir / f"snapshot_{phase.split()[0]}.pt")
            return on_step

        torch.manual_seed(args.seed)
        model = TinyBeauty(TinyBeautyConfig.uniform(24, 2))
        fit(model, make_batch_fn(bare, made, 16, 128),
            FitConfig(steps=args.crop_steps, lr=2e-3, lr_min=1e-4, seed=args.seed), on_step=log("crops 128"))
        if args.full_steps > 0:
            fit(model, make_batch_fn(bare, made, 4, None),
                FitConfig(steps=args.full_steps, lr=3e-4, lr_min=1e-6, warmup=20, seed=args.seed + 1),
                on_step=log("full 256"))
        if args.l1_steps > 0:
            convs = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
            fit(model, make_batch_fn(bare, made, 16, 128),
                FitConfig(steps=args.l1_steps, lr=3e-4, lr_min=1e-6, warmup=20, seed=args.seed + 5, l1=args.l1),
                penalized=convs, on_step=log("l1 crops 128"))
        torch.save(model.state_dict(), weights)
    else:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    train_seconds = time.perf_counter() - t0

    scores = evaluate(TorchRunner(model), builtin_test_set(256))
    psnr, baseline = scores.target_psnr_db, scores.do_nothing_psnr_db
    print(f"built-in test set ({synthetic.TEST_COUNT} pairs, seed {synthetic.TEST_SEED}):")
    print(f"  PSNR against targets: {psnr:.2f} dB")
    print(f"  do-nothing baseline:  {baseline:.2f} dB  (margin {psnr - baseline:+.2f} dB)")

    from tinybeauty_cli.core.artifact import Artifact, HistoryStep, save_artifact

    step = HistoryStep.now(
        "train-demo",
        command=" ".join(["python", "scripts/train_demo.py", *sys.argv[1:]]),
        config={"pairs": args.pairs, "train_seed": synthetic.TRAIN_SEED, "crop_steps": args.crop_steps,
                "full_steps": args.full_steps, "l1_steps": args.l1_steps, "l1": args.l1, "seed": args.seed, "threads": args.threads},
        figures={"test_psnr_db": round(psnr, 3), "do_nothing_psnr_db": round(baseline, 3),
                 "train_seconds": round(train_seconds, 1)},
    )
    artifact = Artifact.for_tinybeauty(model.config, model.state_dict(), history=[step])
    save_artifact(artifact, args.out, force=args.force)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
