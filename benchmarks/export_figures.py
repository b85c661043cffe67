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

fp16 image files (``--only image-fp16``): the made-up image of fp16 ML Program image files as
written before (``x + r``, the clip, ``+ 1``, ``* 127.5`` in fp16) and now (those ops in fp32), of
their tensor-I/O twins and of NeuralNetwork files, against the fp32 network on real faces
(``--faces``), before and after 8-bit rounding, fp16 hardware emulated by the reference executor.
4. int8 activations and iOS 18 weights (`--only quant`): the released checkpoint as a W8A8
   .mlpackage (`--weights int8 --activations int8`: target, ops in the file, fidelity on the real
   face through tbopt's reference executor), the demo checkpoint's W8A8 file scored by
   `tbopt bench` on the built-in test set; then int4 per-block weights and 4-bit palettes per
   group of output channels (with and without per-channel scales) beside today's per-tensor
   pal4, palette bits chosen per layer within pal4's size (`--bits-by-layer auto`, alone and
   with `--fit-palettes`), and palettes chosen by GPTQ (`--palette-method gptq`): size on disk and
   fidelity on the real face (reference executor) and on 8 test images, and the best fidelity within 2% of pal4's size (`--only quant --no-w8a8`: the
   weights table alone); then the same choice in the NeuralNetwork .mlmodel (iOS 13) against uniform
   pal4 there (`--only quant-mlmodel [--pruned ARTIFACT]`: those rows alone, of the pruned artifact too,
   with its PSNR against the targets of 100 test images by `tbopt bench`).

Export must be quick (it runs inside `tbopt run`): every export's time is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from _common import REALDATA, load_note
from _common import tbopt as tbopt_process

from tinybeauty_cli.core import synthetic  # noqa: E402
from tinybeauty_cli.core.artifact import Artifact, HistoryStep, save_artifact
from tinybeauty_cli.core.checkpoint import load_model
from tinybeauty_cli.core.files import size_on_disk, zipped_size  # noqa: E402
from tinybeauty_cli.core.images import builtin_test_set, read_image, to_model_size, uint8_to_model  # noqa: E402
from tinybeauty_cli.core.model import LayerNorm, TinyBeauty, config_from_state_dict  # noqa: E402
from tinybeauty_cli.core.paths import demo_checkpoint  # noqa: E402
from tinybeauty_cli.core.quality import fidelity_per_image_db  # noqa: E402
from tinybeauty_cli.core.training import FitConfig, fit  # noqa: E402
from tinybeauty_cli.coreml.runner import open_coreml_runner  # noqa: E402
from tinybeauty_cli.coreml.spec import coremltools, package_parts, quiet  # noqa: E402
from tinybeauty_cli.export import convert as export_convert  # noqa: E402
from tinybeauty_cli.export.config import ExportConfig  # noqa: E402
from tinybeauty_cli.export.palettes import fit_palettes  # noqa: E402
from tinybeauty_cli.flow.export import decompressed_twin, export_file  # noqa: E402
from tinybeauty_cli.measure.evaluate import evaluate  # noqa: E402
from tinybeauty_cli.prune.channel import layer_norm_pruner  # noqa: E402  (torch-pruning rule for the LayerNorm)
from tinybeauty_cli.runtime.runners import TorchRunner  # noqa: E402

WEIGHTS = (None, "int8", "pal8", "pal6", "pal4", "pal3", "pal2")


def kb(n: int) -> str:
    return f"{n:>9,}"


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
    """``tbopt ARGS --json`` in a subprocess: (what it printed, wall seconds)."""
    wall, proc = tbopt_process(*args, "--json")
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
        exact = decompressed_twin(out, load_model(src))
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


# --- fp16 image files: the image post-processing in fp32 -----------------------------------------------------


def _fidelities(path: Path, x: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    """(fp16 emulated before 8-bit rounding, fp16 emulated after it, fp32 arithmetic before it):
    mean fidelity (dB) of a file's made-up images against ``want``."""
    got = []
    for emulate, rounded in ((True, False), (True, True), (False, False)):
        runner = open_coreml_runner(path, use_device=False, fp16_emulation=emulate, round_image_output=rounded)
        got.append(float(np.mean(fidelity_per_image_db(runner.predict(x), want))))
    return got[0], got[1], got[2]


def _tail(path: Path) -> str:
    """The ops after the network's last tanh in the fp16-emulated executor, each with its precision."""
    runner = open_coreml_runner(path, use_device=False, fp16_emulation=True)
    steps = runner.backend.executor.graph.steps
    last = max((k for k, st in enumerate(steps) if st.kind == "tanh"), default=len(steps) - 1)
    return ", ".join(f"{st.kind} {'fp16' if st.rounded else 'fp32'}" for st in steps[last + 1:]) or "none"


def image_fp16_fidelity(ckpt: Path, faces: list[Path], work: Path) -> None:
    """Section image-fp16: what fp16 image files lose to their own post-processing, before and after."""
    print(f"\n== fp16 image files: the made-up image in fp32 ({load_note()})")
    loaded = load_model(ckpt)
    size = loaded.preprocessing.size
    x = uint8_to_model(np.stack([to_model_size(read_image(f), size) for f in faces]))
    model = loaded.module.eval()
    with torch.inference_mode():
        r = torch.cat([model(torch.from_numpy(x[i:i + 1])) for i in range(len(x))]).numpy()
    want = np.clip(x + r, -1.0, 1.0)  # the fp32 network's made-up faces
    print(f"  {ckpt.name} at {size} px on {', '.join(f.name for f in faces)}; fidelity of each file's made-up "
          "image against the fp32 network (compressed weights: against the PyTorch model carrying the file's "
          "weights), computed by the reference executor with fp16 rounding after every fp16-typed op; "
          "'fp32 ops' = the same file in fp32 arithmetic")
    print(f"  {'file':40s} {'before 8-bit':>12s} {'after 8-bit':>12s} {'fp32 ops':>10s}  image tail")
    cases = [("fp16", ".mlpackage", "image", "before"), ("fp16", ".mlpackage", "image", "now"),
             ("fp16", ".mlpackage", "tensor", "now"),
             ("int8", ".mlpackage", "image", "before"), ("int8", ".mlpackage", "image", "now"),
             ("pal4", ".mlpackage", "image", "before"), ("pal4", ".mlpackage", "image", "now"),
             ("fp16", ".mlmodel", "image", "now"), ("fp16", ".mlmodel", "tensor", "now")]
    whole_graph_fp16 = mock.patch.object(export_convert, "_compute_precision",
                                         lambda ct, config: getattr(ct.precision, config.precision.replace("fp", "FLOAT")))
    for weights, suffix, io, when in cases:
        out = work / f"image_fp16_{weights}_{io}_{when}{suffix}"
        config = ExportConfig.for_output(out, weights=None if weights == "fp16" else weights, io=io)
        if when == "before":  # as tbopt wrote it before: coremltools' fp16 pass over the whole graph
            with whole_graph_fp16:
                export_file(ckpt, out, config, force=True)
        else:
            export_file(ckpt, out, config, force=True)
        ref = want
        if weights != "fp16":
            twin = decompressed_twin(out, loaded)
            with torch.inference_mode():
                rt = torch.cat([twin(torch.from_numpy(x[i:i + 1])) for i in range(len(x))]).numpy()
            ref = np.clip(x + rt, -1.0, 1.0)
        before, after, fp32 = _fidelities(out, x, ref)
        label = f"{weights} {io}{suffix}" + (" (before)" if when == "before" else "")
        if io != "image":  # a tensor output is not rounded to 8 bits
            tail, after_s = "-", f"{'-':>12s}"
        else:
            tail = _tail(out) if suffix == ".mlpackage" else "no per-layer precision: the device's, every layer"
            after_s = f"{after:9.2f} dB"
        print(f"  {label:40s} {before:9.2f} dB {after_s} {fp32:7.2f} dB  {tail}")


# --- 4. int8 activations, int4 per block, palettes per group of channels ----------------------------------------


def coreml_fidelity(path: Path, images, reference) -> tuple[float, float]:
    """(fidelity, worst) of a Core ML file run by the reference executor against the float outputs
    ``reference`` (the app's view: image outputs rounded to 8 bits, as Core ML stores them)."""
    from tinybeauty_cli.coreml.runner import open_coreml_runner

    ev = evaluate(open_coreml_runner(path, use_device=False), images, reference=reference)
    return ev.fidelity_psnr_db, ev.worst_fidelity_db


def quant_section(released: Path, demo: Path, work: Path, face_dir: Path, fit_steps: int = 150,
                  w8a8: bool = True) -> None:
    from tinybeauty_cli.core.images import load_folder

    print(f"\n== 4. int8 activations (W8A8, iOS 17) and iOS 18 weights ({load_note()})")
    face = load_folder(face_dir, 256)
    test8 = builtin_test_set(256, limit=8)
    original = load_model(released)
    face_ref = evaluate(TorchRunner(original.module), face).outputs
    test_ref = evaluate(TorchRunner(original.module), test8).outputs

    if w8a8:
        w8a8_files(released, demo, work, face, face_ref, test8, test_ref)
    weights_table(released, work, face, face_ref, test8, test_ref, fit_steps)
    mlmodel_bits_rows([released], work, face, test8)


def w8a8_files(released: Path, demo: Path, work: Path, face, face_ref, test8, test_ref) -> None:
    out = work / "released_w8a8.mlpackage"
    args = ["export", str(released), "-o", str(out), "--weights", "int8", "--activations", "int8", "--force"]
    d, wall = tbopt(*args)
    print(f"  tbopt {' '.join(a if '/' not in a else Path(a).name for a in args)}")
    print(f"    {d['format']} target {d['target']}, weights {d['weights']}, activations int8 "
          f"({d['activations']['quantize_dequantize_pairs']} quantize/dequantize pairs, ranges from "
          f"{d['activations']['calibration']}); {d['size_bytes']:,} B on disk; export {d['seconds']} s "
          f"(command {wall:.1f} s)")
    print(f"    ops in the file: {', '.join(f'{k} {v}' for k, v in d['ops'].items())}")
    fid, worst = coreml_fidelity(out, face, face_ref)
    print(f"    fidelity on {', '.join(face.names)} (reference executor, 8-bit output, vs the float released "
          f"model): {fid:.2f} dB  {'>= 40 dB: yes' if fid >= 40 else 'BELOW 40 dB'}")
    fid, worst = coreml_fidelity(out, test8, test_ref)
    print(f"    fidelity on 8 built-in test images: {fid:.2f} dB (worst {worst:.2f} dB)")

    demo_out = work / "demo_w8a8.mlpackage"
    tbopt("export", str(demo), "-o", str(demo_out), "--weights", "int8", "--activations", "int8", "--force")
    args = ["bench", str(demo), str(demo_out), "--no-timing"]
    b, wall = tbopt(*args)
    row = b["rows"][1]
    print(f"  tbopt export {demo.name} -o {demo_out.name} --weights int8 --activations int8; "
          f"tbopt {' '.join(a if '/' not in a else Path(a).name for a in args)} ({wall:.0f} s)")
    print(f"    demo W8A8 on {b['data']}: fidelity {row['fidelity_psnr_db']:.2f} dB (worst "
          f"{row['worst_fidelity_db']:.2f} dB), PSNR vs targets {row['target_psnr_db']:.2f} dB (float "
          f"{b['rows'][0]['target_psnr_db']:.2f} dB)  {'>= 40 dB: yes' if row['fidelity_psnr_db'] >= 40 else 'BELOW'}")


def weights_table(released: Path, work: Path, face, face_ref, test8, test_ref, fit_steps: int) -> None:
    """iOS 18 weights beside per-tensor pal4: size, fidelity on the face and on 8 test images."""
    variants = [("pal4 per tensor (today)", dict(weights="pal4"))]
    variants += [(f"int4 per-block {b}", dict(weights="int4", block_size=b)) for b in (24, 8, 4)]
    variants += [(f"pal4 groups of {g}", dict(weights="pal4", granularity="per-grouped-channel", group_size=g))
                 for g in (8, 4, 2, 1)]
    variants += [("pal4 per-channel scale", dict(weights="pal4", per_channel_scale=True)),
                 ("pal3 groups of 1", dict(weights="pal3", granularity="per-grouped-channel", group_size=1))]
    # bits chosen per layer within pal4's size (sensitivities on synthetic portraits, never the test images),
    # alone and fitted onto the palettes; uniform pal4 fitted as the fitting's own baseline
    variants += [("pal4 bits by layer", dict(weights="pal4", bits_by_layer="auto")),
                 (f"pal4 fitted {fit_steps}", dict(weights="pal4", fit_palettes=fit_steps)),
                 (f"pal4 bits by layer fitted {fit_steps}", dict(weights="pal4", bits_by_layer="auto",
                                                                  fit_palettes=fit_steps))]
    # entries chosen by GPTQ and tables refit on each layer's output (16 synthetic portraits): same bytes as pal4
    variants += [("pal4 GPTQ", dict(weights="pal4", palette_method="gptq")),
                 ("pal3 GPTQ", dict(weights="pal3", palette_method="gptq"))]
    print(f"  released checkpoint, .mlpackage, image I/O; fidelity vs the float model through the reference "
          f"executor (8-bit output), on {face.names[0]} and on 8 built-in test images")
    print("  (twin dB: PyTorch with the file's weights vs the model exported -- for the fitted rows, the fitted "
          "model, not the float original)")
    print(f"  {'weights':34s} {'target':6s} {'size B':>9s} {'weights B':>9s} {'graph B':>8s} {'face dB':>8s} "
          f"{'test dB':>8s} {'twin dB':>8s} {'export':>7s}")
    rows = []
    for name, kw in variants:
        path = work / f"released_{name.replace(' ', '_').replace('+', '')}.mlpackage"
        r = export_file(released, path, ExportConfig.for_output(path, **kw), force=True)
        face_db, _ = coreml_fidelity(path, face, face_ref)
        test_db, _ = coreml_fidelity(path, test8, test_ref)
        rows.append((name, r, face_db, test_db))
        print(f"  {name:34s} {r.target:6s} {kb(r.size_bytes)} {kb(r.weight_bytes)} {r.graph_bytes:8,} "
              f"{face_db:8.2f} {test_db:8.2f} {r.validation['fidelity_psnr_db']:8.2f} {r.seconds:6.1f}s", flush=True)
        if r.bits_by_layer:
            bits = [f"{'.'.join(layer['layer'].split('.')[-2:])} {layer['bits']}" for layer in r.bits_by_layer["layers"]
                    if layer["bits"] != r.bits_by_layer["uniform_bits"]]
            print(f"      bits by layer: {', '.join(bits)}, the other layers {r.bits_by_layer['uniform_bits']} (predicted "
                  f"{r.bits_by_layer['predicted_gain_db']:+.2f} dB on the calibration images)")
    base = rows[0]
    print(f"  against pal4 per tensor ({base[1].size_bytes:,} B):")
    base_twin = base[1].validation["fidelity_psnr_db"]
    for name, r, face_db, test_db in rows[1:]:
        print(f"    {name:34s} size x{r.size_bytes / base[1].size_bytes:.3f}, face {face_db - base[2]:+.2f} dB, "
              f"test images {test_db - base[3]:+.2f} dB, twin {r.validation['fidelity_psnr_db'] - base_twin:+.2f} dB")
    fits = [row for row in rows[1:] if row[1].size_bytes <= base[1].size_bytes * 1.02]
    if fits:
        best = max(fits, key=lambda row: row[3])
        gain, face_gain = best[3] - base[3], best[2] - base[2]
        print(f"  within 2% of pal4's size: best {best[0]} ({best[1].size_bytes:,} B, x"
              f"{best[1].size_bytes / base[1].size_bytes:.3f}), {gain:+.2f} dB on the test images "
              f"({'>= +3 dB: yes' if gain >= 3 else 'below the +3 dB asked'}), {face_gain:+.2f} dB on the face "
              f"({'>= +3 dB: yes' if face_gain >= 3 else 'below the +3 dB asked'})")
        best_face = max(fits, key=lambda row: row[2])
        print(f"  within 2% of pal4's size, best on the face: {best_face[0]}, {best_face[2] - base[2]:+.2f} dB")
    else:
        print(f"  no variant is within 2% of pal4 per tensor's size ({base[1].size_bytes:,} B)")
    print(f"  ({load_note()} at the end)")


def mlmodel_bits_rows(checkpoints: list[Path], work: Path, face, test8, pruned: Path | None = None,
                      demo: Path | None = None, threads: int = 1) -> None:
    """The NeuralNetwork .mlmodel (iOS 13): uniform pal4 against bits chosen per layer within its size,
    size on disk and fidelity (reference executor) on the face and 8 test images; the files of
    ``pruned`` (a pruned ``demo`` checkpoint) also scored against the targets of the first 100 test
    images (`tbopt bench demo file`)."""
    print(f"\n  .mlmodel (NeuralNetwork, iOS 13), image I/O, fp16; fidelity vs each float model through the "
          f"reference executor (8-bit output), on {face.names[0]} and on 8 built-in test images")
    print(f"  {'checkpoint':22s} {'weights':22s} {'size B':>9s} {'face dB':>8s} {'test dB':>8s} {'export':>7s}")
    for ckpt in checkpoints:
        original = load_model(ckpt)
        face_ref = evaluate(TorchRunner(original.module), face).outputs
        test_ref = evaluate(TorchRunner(original.module), test8).outputs
        base, files = None, []
        for name, kw in (("pal4", dict(weights="pal4")), ("pal4 bits by layer", dict(weights="pal4",
                                                                                      bits_by_layer="auto"))):
            path = work / f"{ckpt.stem}_{name.replace(' ', '_')}.mlmodel"
            r = export_file(ckpt, path, ExportConfig.for_output(path, **kw), force=True)
            face_db, _ = coreml_fidelity(path, face, face_ref)
            test_db, _ = coreml_fidelity(path, test8, test_ref)
            files.append(path)
            print(f"  {ckpt.name[:22]:22s} {name:22s} {kb(r.size_bytes)} {face_db:8.2f} {test_db:8.2f} "
                  f"{r.seconds:6.1f}s", flush=True)
            if r.bits_by_layer:
                print(f"      bits {[layer['bits'] for layer in r.bits_by_layer['layers']]} (predicted "
                      f"{r.bits_by_layer['predicted_gain_db']:+.2f} dB on the calibration images); against pal4: "
                      f"{r.size_bytes - base[0]:+,} B, face {face_db - base[1]:+.2f} dB, test images "
                      f"{test_db - base[2]:+.2f} dB")
            base = base or (r.size_bytes, face_db, test_db)
        if demo is not None and ckpt == pruned:
            args = ["bench", str(demo), str(ckpt), *map(str, files), "--no-timing", "--limit", "100",
                    "--threads", str(threads)]
            b, wall = tbopt(*args)
            def db(v: float | None) -> str:
                return "-" if v is None else f"{v:.2f} dB"

            scores = ", ".join(f"{row['name']} {db(row['target_psnr_db'])} (fidelity {db(row['fidelity_psnr_db'])})"
                               for row in b["rows"])
            print(f"      tbopt {' '.join(a if '/' not in a else Path(a).name for a in args)} ({wall:.0f} s), PSNR vs "
                  f"targets on {b['data']}: {scores}")
    print(f"  ({load_note()} at the end)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="demo checkpoint (default: assets/)")
    ap.add_argument("--released", type=Path, default=REALDATA / "tinybeauty_style1.pt",
                    help="the released checkpoint (default: ../shared/realdata beside the checkout)")
    ap.add_argument("--pruned", type=Path, default=None, help="a channel-pruned artifact of the checkpoint")
    ap.add_argument("--ratio", type=float, default=0.25, help="torch-pruning channel ratio")
    ap.add_argument("--finetune-steps", type=int, default=600)
    ap.add_argument("--palette-steps", type=int, default=300, help="fine-tuning steps onto the palettes")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faces", type=Path, nargs="+", default=[REALDATA / "face_01.png"],
                    help="real faces for the fp16 image files (default: ../shared/realdata/face_01.png)")
    ap.add_argument("--only", choices=("released", "demo", "preset", "image-fp16", "quant", "quant-mlmodel"),
                    action="append", help="quant-mlmodel: section 4's .mlmodel rows alone (with --pruned: of it too)")
    ap.add_argument("--no-w8a8", action="store_true", help="section 4: only the weights table (no W8A8 files)")
    ap.add_argument("--fit-steps", type=int, default=150, help="section 4: --fit-palettes steps of the fitted rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="export_figures_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tbopt export figures; torch {torch.__version__}, {args.threads} threads, work dir {work}")
    only = set(args.only or ("released", "demo", "preset", "image-fp16", "quant"))
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
    if "image-fp16" in only:
        faces = [f for f in args.faces if f.is_file()]
        if args.released.is_file() and faces:
            image_fp16_fidelity(args.released, faces, work)
        else:
            print(f"\n== fp16 image files: skipped: {args.released} or the faces are absent")
    if "quant" in only:
        if args.released.is_file():
            quant_section(args.released, ckpt, work, args.released.parent, args.fit_steps, not args.no_w8a8)
        else:
            print(f"\n== 4. skipped: {args.released} is absent")
    if "quant-mlmodel" in only:
        from tinybeauty_cli.core.images import load_folder

        print(f"\n== 4. bits by layer in the .mlmodel ({load_note()})")
        checkpoints = [p for p in (args.pruned, args.released) if p is not None and p.is_file()]
        mlmodel_bits_rows(checkpoints, work, load_folder(args.faces[0].parent, 256), builtin_test_set(256, limit=8),
                          pruned=args.pruned, demo=ckpt, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
