"""Figures for `tbopt export`, all measured in one run.

    python benchmarks/export_figures.py [--checkpoint tinybeauty_cli/core/assets/tinybeauty_demo.pt]
        [--released ../shared/realdata/tinybeauty_style1.pt] [--pruned ARTIFACT]
        [--ratio 0.25] [--finetune-steps 600] [--palette-steps 300] [--work-dir DIR]

1. The released checkpoint: coremltools' own defaults against tbopt export, for every format
   and compression (bytes on disk and zipped, graph description, weights, time, weights
   fidelity: PyTorch with the file's decompressed weights vs the float model).
2. The demo checkpoint: `tbopt export --fp16 -o TinyBeauty.mlmodel` (the command line, wall
   time included) for iOS 13, and `--weights int8` as .mlmodel (< 100 KB asked).
3. The smallest sensible preset: a channel-pruned demo model (torch-pruning, fine-tuned on
   synthetic training pairs; or --pruned, e.g. the output of `tbopt prune`), palettized, as
   an .mlpackage (<= 50 KB asked), scored against the targets of the built-in test set with
   the exact decompressed weights (within 0.3 dB of the float original asked) -- palettized
   straight from the pruned weights, and after fine-tuning onto the palettes
   (`tinybeauty_cli.export.palettes.fit_palettes`, what `tbopt export --fit-palettes` runs), which the export then stores exactly.

Export must be quick (it runs inside `tbopt run`): every export's time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.coreml_helpers import decompressed_model  # noqa: E402
from tinybeauty_cli.core import synthetic  # noqa: E402
from tinybeauty_cli.core.artifact import Artifact, HistoryStep, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.files import size_on_disk, zipped_size  # noqa: E402
from tinybeauty_cli.core.images import builtin_test_set  # noqa: E402
from tinybeauty_cli.core.model import LayerNorm, TinyBeauty, config_from_state_dict  # noqa: E402
from tinybeauty_cli.core.paths import demo_checkpoint  # noqa: E402
from tinybeauty_cli.core.training import FitConfig, fit  # noqa: E402
from tinybeauty_cli.coreml.spec import coremltools, package_parts, quiet  # noqa: E402
from tinybeauty_cli.export.config import ExportConfig  # noqa: E402
from tinybeauty_cli.export.palettes import fit_palettes  # noqa: E402
from tinybeauty_cli.flow.export import export_file  # noqa: E402
from tinybeauty_cli.measure.evaluate import evaluate  # noqa: E402
from tinybeauty_cli.prune.channel import layer_norm_pruner  # noqa: E402  (torch-pruning rule for the LayerNorm)
from tinybeauty_cli.runtime.runners import TorchRunner  # noqa: E402

WEIGHTS = (None, "int8", "pal8", "pal6", "pal4", "pal3", "pal2")


def kb(n: int) -> str:
    return f"{n:>9,}"


def load_note() -> str:
    load1, _, _ = os.getloadavg()
    return f"load average {load1:.1f} on {os.cpu_count()} cores"


# --- 1. coremltools defaults vs tbopt on the released checkpoint ------------------------------------------


def coremltools_defaults(ckpt: Path, work: Path) -> dict[str, dict]:
    """What plain coremltools writes: trace, convert, optimize.coreml with default configs."""
    ct = coremltools()
    model = load_model(ckpt).module
    traced = torch.jit.trace(model, torch.zeros(1, 3, 256, 256))
    out = {}
    with quiet():
        t = time.perf_counter()
        fp16 = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 3, 256, 256))],
                          convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)
        convert_s = time.perf_counter() - t
        opt = ct.optimize.coreml
        variants = {
            "fp16": (fp16, convert_s),
        }
        t = time.perf_counter()
        int8 = opt.linear_quantize_weights(fp16, opt.OptimizationConfig(
            global_config=opt.OpLinearQuantizerConfig(mode="linear_symmetric")))
        variants["int8"] = (int8, convert_s + time.perf_counter() - t)
        for bits in (4, 2):
            t = time.perf_counter()
            pal = opt.palettize_weights(fp16, opt.OptimizationConfig(
                global_config=opt.OpPalettizerConfig(mode="kmeans", nbits=bits)))
            variants[f"pal{bits}"] = (pal, convert_s + time.perf_counter() - t)
        nn = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 3, 256, 256))],
                        convert_to="neuralnetwork", minimum_deployment_target=ct.target.iOS13)
        from coremltools.models.neural_network import quantization_utils as qu

        nn16 = qu.quantize_weights(nn, 16)
        nn8 = qu.quantize_weights(nn, 8)
    for name, (m, seconds) in variants.items():
        path = work / f"default_{name}.mlpackage"
        with quiet():
            m.save(str(path))
        graph, _ = package_parts(path)
        out[f"mlpackage {name}"] = {"size": size_on_disk(path), "zipped": zipped_size(path),
                                    "graph": graph.stat().st_size, "seconds": seconds}
    for name, m in (("fp16", nn16), ("int8", nn8)):
        path = work / f"default_{name}.mlmodel"
        with quiet():
            m.save(str(path))
        out[f"mlmodel {name}"] = {"size": size_on_disk(path), "zipped": zipped_size(path), "graph": None,
                                  "seconds": None}
    return out


def released_table(ckpt: Path, work: Path) -> None:
    print(f"\n== 1. released checkpoint {ckpt.name}: coremltools defaults vs tbopt export ({load_note()})")
    defaults = coremltools_defaults(ckpt, work)
    print("coremltools defaults (trace + ct.convert + optimize.coreml / quantize_weights, default configs):")
    for name, d in defaults.items():
        graph = "" if d["graph"] is None else f"  graph {kb(d['graph'])}"
        print(f"  {name:18s} size {kb(d['size'])} B  zipped {kb(d['zipped'])}{graph}")
    print("tbopt export (image in, made-up image out; weights fidelity = PyTorch with the file's decompressed "
          "weights vs the float model, 2 images):")
    print(f"  {'file':30s} {'target':6s} {'size B':>9s} {'zipped':>9s} {'graph':>9s} {'weights':>9s} "
          f"{'vs default':>10s} {'fidelity':>9s} {'time':>6s}")
    for suffix in (".mlmodel", ".mlpackage"):
        for weights in WEIGHTS:
            name = f"released_{weights or 'fp16'}{suffix}"
            r = export_file(ckpt, work / name, ExportConfig.for_output(name, weights=weights), force=True)
            key = f"{suffix[1:]} {weights or 'fp16'}"
            ratio = f"x{r.size_bytes / defaults[key]['size']:.3f}" if key in defaults else ""
            print(f"  {name:30s} {r.target:6s} {kb(r.size_bytes)} {kb(r.zipped_bytes)} {kb(r.graph_bytes)} "
                  f"{kb(r.weight_bytes)} {ratio:>10s} {r.validation['fidelity_psnr_db']:6.1f} dB {r.seconds:5.1f}s")


# --- 2. the demo checkpoint through the command line ------------------------------------------------------


def tbopt(*args: str) -> tuple[dict, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tinybeauty_cli", *args, "--json"], capture_output=True, text=True,
                          cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"tbopt {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), wall


def demo_commands(ckpt: Path, work: Path) -> None:
    print(f"\n== 2. demo checkpoint {ckpt.name} through the command line ({load_note()})")
    ct = coremltools()
    for args in (["--fp16", "-o", str(work / "TinyBeauty.mlmodel")],
                 ["--weights", "int8", "-o", str(work / "TinyBeauty_int8.mlmodel")]):
        d, wall = tbopt("export", str(ckpt), *args, "--force")
        with quiet():
            spec = ct.utils.load_spec(d["path"])
        print(f"  tbopt export {' '.join(a if '/' not in a else Path(a).name for a in args)}")
        print(f"    {d['format']} target {d['target']} (specification version {spec.specificationVersion}), "
              f"weights {d['weights']}: {d['size_bytes']:,} B on disk, {d['zipped_bytes']:,} B zipped, graph "
              f"{d['graph_bytes']:,} B; fidelity {d['validation']['fidelity_psnr_db']} dB; export {d['seconds']} s, "
              f"command wall time {wall:.1f} s")
        if "int8" in args:
            print(f"    int8 .mlmodel < 100 KB: {'yes' if d['size_bytes'] < 100_000 else 'NO'} "
                  f"({d['size_bytes'] / 100_000:.3f} of 100 KB)")


# --- 3. the smallest sensible preset ------------------------------------------------------------------------


def channel_prune(model: TinyBeauty, ratio: float) -> TinyBeauty:
    """torch-pruning: remove ``ratio`` of the channels of every group (L1 magnitude), output conv kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp

    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[model.out.conv],
                                           customized_pruners={LayerNorm: layer_norm_pruner()})
        pruner.step()
    sd = model.state_dict()
    pruned = TinyBeauty(config_from_state_dict(sd))
    pruned.load_state_dict(sd)
    return pruned.eval()


_PAIRS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def training_pairs(count: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (bare, made-up) pairs from the demo's training seed (never the test seed), [-1, 1]."""
    if count not in _PAIRS:
        bare_u8, made_u8 = synthetic.portraits(synthetic.TRAIN_SEED, count, 256)
        _PAIRS[count] = tuple(torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1)
                              for a in (bare_u8, made_u8))
    return _PAIRS[count]


def batches(batch: int, crop: int | None):
    bare, made = training_pairs()

    def make(step, gen):
        idx = torch.randint(0, len(bare), (batch,), generator=gen)
        x, y = bare[idx], made[idx]
        if crop is not None:
            t = torch.randint(0, 256 - crop + 1, (2,), generator=gen).tolist()
            x, y = x[:, :, t[0]:t[0] + crop, t[1]:t[1] + crop], y[:, :, t[0]:t[0] + crop, t[1]:t[1] + crop]
        return x.contiguous(), y.contiguous()
    return make


def progress_log(what: str):
    t = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if step % 100 == 0:
            print(f"    {what} step {step}: L1 {loss:.4f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr,
                  flush=True)
    return log


def finetune(model: TinyBeauty, steps: int) -> float:
    """Recover quality after channel pruning: 3/4 of the steps on 128 px crops, then whole faces."""
    crop_steps, full_steps = steps * 3 // 4, steps - steps * 3 // 4
    t = time.perf_counter()
    log = progress_log("fine-tuning")
    fit(model, batches(8, 128), FitConfig(steps=crop_steps, lr=5e-4, lr_min=1e-5, warmup=20, seed=1), on_step=log)
    fit(model, batches(4, None), FitConfig(steps=full_steps, lr=1e-4, lr_min=1e-6, warmup=10, seed=2), on_step=log)
    model.eval()
    return time.perf_counter() - t


def palette_fitted(pruned_path: Path, bits: int, steps: int, work: Path) -> Path:
    """The pruned model with its conv weights fitted to 2**bits-value palettes (cached in the work dir)."""
    loaded = load_model(pruned_path)
    path = work / f"{pruned_path.stem}_pal{bits}_s{steps}.pt"
    if path.is_file():
        return path
    model = loaded.artifact.build_model()
    t = time.perf_counter()
    result = fit_palettes(model, bits, batches(4, None), FitConfig(steps=steps, lr=1e-4, lr_min=1e-6, warmup=10,
                                                                     seed=3), on_step=progress_log(f"{bits}-bit palettes"))
    step = HistoryStep.now("fit-palettes", "benchmarks/export_figures.py", {"bits": bits, "steps": steps},
                           {"seconds": round(time.perf_counter() - t, 1), **result.to_dict()})
    save_artifact(Artifact.for_tinybeauty(model.config, model.state_dict(), history=[*loaded.history, step]), path)
    return path


def preset(ckpt: Path, work: Path, pruned_path: Path | None, ratio: float, steps: int, palette_steps: int) -> None:
    print(f"\n== 3. smallest sensible preset: channel-pruned + palettized .mlpackage ({load_note()})")
    original = load_model(ckpt)
    if pruned_path is None:
        pruned_path = work / f"pruned_r{ratio:g}_s{steps}_{original.sha256[:10]}.pt"
        if pruned_path.is_file():
            print(f"  channel-pruned model: reusing {pruned_path}")
        else:
            student = channel_prune(original.artifact.build_model(), ratio)
            seconds = finetune(student, steps)
            step = HistoryStep.now("prune", "benchmarks/export_figures.py",
                                   {"method": "channel (torch-pruning MagnitudePruner, L1)", "ratio": ratio,
                                    "finetune_steps": steps}, {"finetune_seconds": round(seconds, 1)})
            save_artifact(Artifact.for_tinybeauty(student.config, student.state_dict(),
                                                  history=[*original.artifact.history, step]), pruned_path)
            print(f"  channel-pruned model: torch-pruning ratio {ratio}, fine-tuned {steps} steps in {seconds:.0f} s")
    pruned = load_model(pruned_path)
    n0 = sum(p.numel() for p in original.module.parameters())
    n1 = sum(p.numel() for p in pruned.module.parameters())
    print(f"  parameters {n0:,} -> {n1:,} (x{n1 / n0:.3f}); widths {pruned.artifact.arch.config}")

    test = builtin_test_set(256)
    ref = evaluate(TorchRunner(original.module), test)
    rows = [("float original", None, ref.target_psnr_db, None)]
    pr = evaluate(TorchRunner(pruned.module), test, reference=ref.outputs)
    rows.append(("channel-pruned float", None, pr.target_psnr_db, pr.fidelity_psnr_db))
    candidates = [("pruned, pal4", pruned_path, "pal4"), ("pruned, pal6", pruned_path, "pal6")]
    for bits in (4, 3):
        t = time.perf_counter()
        fitted = palette_fitted(pruned_path, bits, palette_steps, work)
        print(f"  {bits}-bit palettes fitted ({palette_steps} steps): {fitted.name} ({time.perf_counter() - t:.0f} s)")
        candidates.append((f"pruned, fitted {bits}-bit, pal{bits}", fitted, f"pal{bits}"))
    for name, src, weights in candidates:
        out = work / f"{Path(src).stem}_{weights}.mlpackage"
        r = export_file(src, out, ExportConfig.for_output(out, weights=weights), force=True)
        exact = decompressed_model(out, load_model(src))
        ev = evaluate(TorchRunner(exact), test, reference=ref.outputs)
        rows.append((name, r, ev.target_psnr_db, ev.fidelity_psnr_db))
    print(f"  built-in test set: {test.source}; PSNR vs targets, and fidelity vs the float original "
          "(the .mlpackage rows: PyTorch with the files' exact decompressed weights, fp32)")
    print(f"  {'model':34s} {'target':6s} {'size B':>9s} {'zipped':>9s} {'graph':>9s} {'weights':>9s} "
          f"{'PSNR dB':>8s} {'vs orig':>8s} {'fidelity':>9s} {'export':>7s}")
    for name, r, psnr, fid in rows:
        size = (f"{r.target:6s} {kb(r.size_bytes)} {kb(r.zipped_bytes)} {kb(r.graph_bytes)} {kb(r.weight_bytes)}"
                if r is not None else "")
        fid_s = "" if fid is None else f"{fid:6.2f} dB"
        t = "" if r is None else f"{r.seconds:5.1f}s"
        print(f"  {name:34s} {size:46s} {psnr:8.2f} {psnr - ref.target_psnr_db:+8.2f} {fid_s:>9s} {t:>7s}")
    ok = [row for row in rows if row[1] is not None and row[1].size_bytes <= 50_000
          and row[2] >= ref.target_psnr_db - 0.3]
    if ok:
        name, r, psnr, _ = min(ok, key=lambda row: row[1].size_bytes)
        print(f"  smallest preset with <= 50 KB and within 0.3 dB: {name}: {r.size_bytes:,} B "
              f"(x{r.size_bytes / 50_000:.3f} of 50 KB), {psnr - ref.target_psnr_db:+.2f} dB, target {r.target}")
    else:
        print("  NO preset met both <= 50 KB and within 0.3 dB of the float original")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="demo checkpoint (default: assets/)")
    ap.add_argument("--released", type=Path, default=ROOT.parent / "shared" / "realdata" / "tinybeauty_style1.pt",
                    help="the released checkpoint (default: ../shared/realdata beside the checkout)")
    ap.add_argument("--pruned", type=Path, default=None, help="a channel-pruned artifact of the checkpoint")
    ap.add_argument("--ratio", type=float, default=0.25, help="torch-pruning channel ratio")
    ap.add_argument("--finetune-steps", type=int, default=600)
    ap.add_argument("--palette-steps", type=int, default=300, help="fine-tuning steps onto the palettes")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("released", "demo", "preset"), action="append")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="export_figures_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tbopt export figures; torch {torch.__version__}, {args.threads} threads, work dir {work}")
    only = set(args.only or ("released", "demo", "preset"))
    if "released" in only:
        if args.released.is_file():
            released_table(args.released, work)
        else:
            print(f"\n== 1. skipped: {args.released} is absent")
    ckpt = args.checkpoint or demo_checkpoint()
    if "demo" in only:
        demo_commands(ckpt, work)
    if "preset" in only:
        preset(ckpt, work, args.pruned, args.ratio, args.finetune_steps, args.palette_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
