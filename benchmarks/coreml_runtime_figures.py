"""Figures for the Core ML reference executor, measured in one run.

For a demo-like TinyBeauty (the bundled demo checkpoint when present, else a released-layout
TinyBeauty with seeded random weights) and for the authors' released checkpoint, every Core ML
variant tbopt's exporter offers is made with coremltools at full size (256 px) and run by the
executor on real and synthetic faces:

* fidelity (PSNR of the made-up images, float, peak-to-peak 2) of the executor's output against
  the PyTorch model: fp32 exports >= 90 dB, fp16 >= 60 dB; compressed exports against the PyTorch
  model carrying the file's decompressed weights >= 60 dB; plus the same with --fp16-emulation;
* latency of the executor on the fp32 ML Program against PyTorch eager on the same model: batch 1,
  same threads, measured alternately in the same run; the bar is a ratio <= 1.5.

Every time here is "Core ML reference executor (not device)": the model's arithmetic on this CPU.

    python benchmarks/coreml_runtime_figures.py [--size 256] [--threads 1,2] [--images 8] [--runs 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from _common import REALDATA

# The Core ML test models, made with coremltools directly (not by tbopt's exporter): the tests'
# reference executor checks run on them, and this benchmark times the same files.
from tests.coreml_models import MLPROGRAM_VARIANTS, NEURALNETWORK_VARIANTS, CoreMLZoo  # noqa: E402
from tinybeauty_cli.core.checkpoint import load_model  # noqa: E402
from tinybeauty_cli.core.errors import InputError  # noqa: E402
from tinybeauty_cli.core.files import size_on_disk  # noqa: E402
from tinybeauty_cli.core.images import builtin_test_set, to_model_size, uint8_to_model  # noqa: E402
from tinybeauty_cli.core.model import TinyBeauty  # noqa: E402
from tinybeauty_cli.core.paths import demo_checkpoint  # noqa: E402
from tinybeauty_cli.core.quality import fidelity_psnr_db  # noqa: E402
from tinybeauty_cli.coreml import runner as cr  # noqa: E402
from tinybeauty_cli.coreml.weights import carry_file_weights, stored_weights  # noqa: E402
from tinybeauty_cli.runtime.runners import TorchRunner  # noqa: E402
from tinybeauty_cli.runtime.timing import measure_latency  # noqa: E402

FP32_DB, FP16_DB, COMPRESSED_DB = 90.0, 60.0, 60.0


def load_models(realdata: Path) -> list[tuple[str, torch.nn.Module]]:
    models = []
    try:
        demo = demo_checkpoint()
        models.append((f"demo checkpoint ({demo.name})", load_model(demo).module.eval()))
    except InputError:
        torch.manual_seed(0)
        model = TinyBeauty().eval()
        with torch.no_grad():  # a trained model's small residuals, not a random net's saturated tanh
            model.out.conv.weight.mul_(0.1)
        models.append(("demo-like TinyBeauty (released layout, seeded random weights, output conv x0.1; "
                       "no demo checkpoint here)", model))
    ckpt = realdata / "tinybeauty_style1.pt"
    if ckpt.is_file():
        models.append(("released tinybeauty_style1.pt", load_model(ckpt).module.eval()))
    else:
        print(f"(no {ckpt}: the released checkpoint is skipped)")
    return models


def load_inputs(realdata: Path, size: int, count: int) -> np.ndarray:
    faces = []
    face = realdata / "face_01.png"
    if face.is_file():
        faces.append(to_model_size(Image.open(face).convert("RGB"), size))
    faces.extend(builtin_test_set(size, limit=count - len(faces)).inputs)
    return uint8_to_model(np.stack(faces))


def torch_predict(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        r = np.concatenate([model(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    return np.clip(x + r, -1.0, 1.0)


def fidelity_rows(zoo: CoreMLZoo, x: np.ndarray, original_out: np.ndarray) -> Iterator[tuple]:
    for name in MLPROGRAM_VARIANTS + NEURALNETWORK_VARIANTS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = zoo.path(name)
        weights = name.split("/")[2]
        if weights in ("fp32", "fp16"):
            ref_out, bar, against = original_out, (FP32_DB if weights == "fp32" else FP16_DB), "PyTorch model"
        else:
            twin = copy.deepcopy(zoo.model)
            carry_file_weights(twin, stored_weights(path), torch.zeros(1, 3, zoo.size, zoo.size))
            ref_out, bar, against = torch_predict(twin, x), COMPRESSED_DB, "PyTorch twin (file's weights)"
        runner = cr.open_coreml_runner(path, use_device=False, round_image_output=False)
        db = fidelity_psnr_db(runner.predict(x), ref_out)
        emulated = cr.open_coreml_runner(path, use_device=False, round_image_output=False, fp16_emulation=True)
        emu_db = fidelity_psnr_db(emulated.predict(x), ref_out) if emulated.backend.fp16_emulation else None
        stored_8bit = ""
        if runner.model.output.kind == "image":  # what an app gets: the 8-bit image output
            stored = cr.open_coreml_runner(path, use_device=False)
            stored_8bit = f"{fidelity_psnr_db(stored.predict(x), ref_out):.1f}"
        yield name, against, db, bar, emu_db, stored_8bit, size_on_disk(path), time.perf_counter() - t0


def latency_rows(zoo: CoreMLZoo, x1: np.ndarray, threads: int, runs: int, rounds: int) -> list[tuple]:
    """Executor vs PyTorch eager on the same model, batch 1, alternating A/B rounds in this run."""
    eager = TorchRunner(zoo.model)
    contenders = [("PyTorch eager fp32 (the checkpoint's model)", eager)]
    for name in ("mlprogram/tensor/fp32", "mlprogram/tensor/fp16", "neuralnetwork/tensor/fp32"):
        contenders.append((f"{cr.REFERENCE_ENGINE}: {name}",
                           cr.open_coreml_runner(zoo.path(name), use_device=False)))
    medians: dict[str, list[float]] = {label: [] for label, _ in contenders}
    for _ in range(rounds):
        for label, runner in contenders:
            lat = measure_latency(lambda r=runner: r.residual(x1), runs=runs, warmup=3, threads=threads)
            medians[label].append(lat.p50_ms)
    base = statistics.median(medians[contenders[0][0]])
    return [(label, statistics.median(m), min(m), max(m), statistics.median(m) / base)
            for label, m in medians.items()]


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", default="1,2", help="thread counts to time with, e.g. 1,2 "
                        "(scoring runs single-threaded: tiny ops spin when other jobs load the cores)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating A/B timing rounds")
    parser.add_argument("--realdata", type=Path, default=REALDATA)
    parser.add_argument("--latency-only", action="store_true", help="skip the fidelity tables (re-time on a busy box)")
    args = parser.parse_args()
    if not (args.realdata / "tinybeauty_style1.pt").is_file() and Path("/work/shared/realdata").is_dir():
        args.realdata = Path("/work/shared/realdata")
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); torch {torch.__version__}; "
          f"size {args.size}px; {args.images} images; timing with {thread_counts} thread(s)")
    x = load_inputs(args.realdata, args.size, args.images)
    all_pass = True
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, model) in enumerate(load_models(args.realdata)):
            zoo = CoreMLZoo(Path(tmp) / f"model{i}", model, args.size)
            zoo.folder.mkdir()
            original_out = torch_predict(model, x)
            if not args.latency_only:
                print(f"\n== {label}: executor output vs PyTorch, fidelity PSNR of made-up images (float, dB), "
                      f"{len(x)} images ==")
                print(f"{'variant':32} {'against':30} {'dB':>7} {'bar':>5} {'ok':>3} {'fp16-emu dB':>11} "
                      f"{'8-bit out dB':>12} {'size KB':>8} {'s':>5}")
                for name, against, db, bar, emu, stored, size, secs in fidelity_rows(zoo, x, original_out):
                    ok = db >= bar
                    all_pass &= ok
                    emu_s = "-" if emu is None else f"{emu:.1f}"
                    print(f"{name:32} {against:30} {db:7.1f} {bar:5.0f} {'yes' if ok else 'NO':>3} {emu_s:>11} "
                          f"{stored or '-':>12} {size / 1000:8.1f} {secs:5.1f}")
            for threads in thread_counts:
                print(f"\n== {label}: latency, batch 1, {threads} thread(s), median of {args.runs} runs per round, "
                      f"{args.rounds} alternating rounds; load average now {os.getloadavg()[0]:.2f} ==")
                print(f"{'engine (executor rows: Core ML reference executor (not device))':82} {'p50 ms':>8} "
                      f"{'min':>8} {'max':>8} {'x eager':>8}")
                for name, p50, lo, hi, ratio in latency_rows(zoo, x[:1], threads, args.runs, args.rounds):
                    print(f"{name:82} {p50:8.1f} {lo:8.1f} {hi:8.1f} {ratio:8.2f}")
                torch.set_num_threads(1)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    if not args.latency_only:
        print("every fidelity bar met" if all_pass else "SOME FIDELITY BARS MISSED")


if __name__ == "__main__":
    main()
