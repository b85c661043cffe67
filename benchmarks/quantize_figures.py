"""Measure the figures tbopt quantize must reach, as ratios measured in one run.

    python benchmarks/quantize_figures.py [--checkpoint tinybeauty_cli/core/assets/tinybeauty_demo.pt] [--threads 2] [--runs 40]

1. ``tbopt quantize`` with its defaults (auto backend, auto keep-float, 32 synthetic calibration
   images) on the checkpoint, timed end to end.
2. Latency at batch 1, 256x256, the same threads for every model, all models timed in alternating
   order (A, B, C, A, B, C, ...) so that load changes hit them alike: the float model in eager mode
   (the reference), the int8 file written by step 1, and for context a frozen fp32 TorchScript trace
   and plain FX int8 (default x86 qconfig mapping, traced and frozen: the baseline that was slower than fp32).
3. Fidelity against the float model and PSNR against the targets of the built-in test set (100
   images) before and after, size on disk and zipped.
4. Where the time goes: torch.profiler tables of the int8 model's operators and of plain FX int8's.

Targets: int8 latency <= 0.5x the float model's eager latency; fidelity >= 45 dB; PSNR drop
<= 0.25 dB; size on disk <= 35% of the float checkpoint. The machine is shared: the load average is
printed at the start and the end (latency ratios suffer most when it is high; re-run then).
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import check, load_note

from tinybeauty_cli.core.checkpoint import load_model  # noqa: E402
from tinybeauty_cli.core.contexts import quantized_engine
from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model  # noqa: E402
from tinybeauty_cli.core.paths import demo_checkpoint  # noqa: E402
from tinybeauty_cli.flow.quantize import quantize_file  # noqa: E402
from tinybeauty_cli.measure.evaluate import evaluate  # noqa: E402
from tinybeauty_cli.quantize.config import QuantizeConfig  # noqa: E402
from tinybeauty_cli.runtime.runners import TorchRunner  # noqa: E402
from tinybeauty_cli.runtime.timing import measure_latencies  # noqa: E402


def plain_fx_int8(model: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor) -> torch.jit.ScriptModule:
    """The baseline that was slower than fp32: FX with the default x86 mapping, calibrated, traced and frozen."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    with warnings.catch_warnings(), quantized_engine("x86"):
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        with torch.no_grad():
            for i in range(0, len(calib), 4):
                prepared(calib[i:i + 4])
            return torch.jit.freeze(torch.jit.trace(convert_fx(prepared).eval(), x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="float checkpoint (default: the demo)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=40, help="timed runs per model (interleaved)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    ckpt = args.checkpoint or demo_checkpoint()
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    print(f"start: {load_note()}")
    print(f"torch {torch.__version__}, {platform.machine()} {caps.get('cpu_name', '')}, AVX2 {caps.get('avx2')}, "
          f"AVX-512 {caps.get('avx512_f')}, VNNI {torch.cpu._is_vnni_supported()}, quantized engines "
          f"{torch.backends.quantized.supported_engines}")
    print(f"checkpoint: {ckpt}")

    # 1. the command with its defaults ---------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tinybeauty_int8.pt"
        t0 = time.perf_counter()
        result = quantize_file(ckpt, out, QuantizeConfig(threads=args.threads), command="benchmark")
        wall = time.perf_counter() - t0
        d = result.to_dict()
        print(f"\n1. tbopt quantize (defaults) took {wall:.1f} s: " +
              ", ".join(f"{k} {v:.1f} s" for k, v in d["timings"].items() if k != "total_s"))
        print(f"   backend {d['backend']} ({d['backend_reason']})")
        for t in d["backends"]:
            print(f"     {t['backend']:8s} {t['status']:13s} all-int8 {t['all_int8_latency_ms']} ms, final "
                  f"{t['latency_ms']} ms, fidelity {t['fidelity_db']} dB, kept float {t['kept_float'] or '-'} "
                  f"{t['note']}")
        print(f"   layers: {len(d['quantized_layers'])} int8, float: {d['float_layers'] or 'none'}")
        for step in d["keep_float_steps"]:
            print(f"     keep-float step: {step}")
        print(f"   rewrites: {'; '.join(d['rewrites']['applied'])}")

        # 2. latency, interleaved ---------------------------------------------------------------
        float_model = load_model(ckpt).module.eval()
        int8 = load_model(out)
        test = builtin_test_set(256)
        x = torch.from_numpy(uint8_to_model(test.inputs[:1]))
        calib = torch.from_numpy(uint8_to_model(builtin_test_set(256, 8).inputs))  # baseline only
        with torch.no_grad():
            frozen_fp32 = torch.jit.freeze(torch.jit.trace(float_model, x))
        baseline = plain_fx_int8(float_model, calib, x)
        engine = int8.metadata["quantized_engine"]
        models = {"float eager (reference)": float_model, "int8 tbopt": int8.module,
                  "fp32 frozen TorchScript": frozen_fp32, "plain FX int8 x86": baseline}
        with torch.inference_mode(), quantized_engine(engine), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lat = measure_latencies({k: (lambda m=m: m(x)) for k, m in models.items()},
                                    runs=args.runs, warmup=5, threads=args.threads)
            lat1 = measure_latencies({k: (lambda m=m: m(x)) for k, m in list(models.items())[:2]},
                                     runs=max(10, args.runs // 2), warmup=3, threads=1)
        ref = lat["float eager (reference)"].p50_ms
        ref_min = lat["float eager (reference)"].min_ms
        print(f"\n2. latency, batch 1, 256x256, {args.threads} thread(s), median of {args.runs} interleaved runs:")
        for k, v in lat.items():
            print(f"   {k:26s} p50 {v.p50_ms:7.2f} ms  p90 {v.p90_ms:7.2f} ms  min {v.min_ms:7.2f} ms  "
                  f"ratio {v.p50_ms / ref:.3f} (of minima {v.min_ms / ref_min:.3f})")
        print(f"   (1 thread: float eager {lat1['float eager (reference)'].p50_ms:.2f} ms, int8 "
              f"{lat1['int8 tbopt'].p50_ms:.2f} ms, ratio "
              f"{lat1['int8 tbopt'].p50_ms / lat1['float eager (reference)'].p50_ms:.3f})")

        # plain FX baseline fidelity on 20 test images, for context
        few = builtin_test_set(256, 20)
        with quantized_engine("x86"):
            ref_out = evaluate(TorchRunner(float_model), few).outputs
            base_fid = evaluate(TorchRunner(baseline, kind="int8"), few, reference=ref_out).fidelity_psnr_db

        # 3. quality and size ---------------------------------------------------------------------
        q, s = d["quality"], d["size"]
        print(f"\n3. quality on {q['images']}:")
        print(f"   PSNR vs targets: float {q['float_target_psnr_db']:.3f} dB, int8 {q['int8_target_psnr_db']:.3f} dB, "
              f"drop {q['target_psnr_drop_db']:.3f} dB")
        print(f"   fidelity vs float: mean {q['fidelity_psnr_db']:.2f} dB, worst image {q['worst_fidelity_db']:.2f} dB "
              f"(plain FX int8 x86 on 20 images: {base_fid:.2f} dB)")
        print(f"   size on disk: float {s['float_bytes']:,} B, int8 {s['int8_bytes']:,} B ({s['ratio']:.3f}); zipped "
              f"{s['float_zipped_bytes']:,} -> {s['int8_zipped_bytes']:,} B ({s['zipped_ratio']:.3f})")

        # 4. profile ------------------------------------------------------------------------------
        if not args.no_profile:
            from torch.profiler import ProfilerActivity, profile
            for title, module, eng in (("int8 tbopt", int8.module, engine), ("plain FX int8 x86", baseline, "x86")):
                with torch.inference_mode(), quantized_engine(eng), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.set_num_threads(args.threads)
                    for _ in range(3):
                        module(x)
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        for _ in range(10):
                            module(x)
                print(f"\n4. {title} profile ({args.threads} thread(s), 10 runs; times are totals over the 10):")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    ratio = lat["int8 tbopt"].p50_ms / ref
    print("targets:")
    print(f"   {check(ratio <= 0.5)}  int8 latency {ratio:.3f}x float eager (<= 0.5x), {args.threads} thread(s)")
    print(f"   {check(q['fidelity_psnr_db'] >= 45)}  fidelity {q['fidelity_psnr_db']:.2f} dB (>= 45 dB)")
    print(f"   {check(q['target_psnr_drop_db'] <= 0.25)}  PSNR drop {q['target_psnr_drop_db']:.3f} dB (<= 0.25 dB)")
    print(f"   {check(s['ratio'] <= 0.35)}  size on disk {s['ratio']:.3f}x the float checkpoint (<= 0.35)")
    print(f"end: {load_note()}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
