"""Measure the figures the ``tbopt optimize`` issue asks for.

    python benchmarks/optimize_figures.py [--work DIR] [--skip-realdata | --only-realdata] [--runs 50]

1. ``tbopt optimize --max-drop 0.3`` on the demo checkpoint, defaults otherwise (targets ios13, cpu,
   ios16): the wall time of the whole search (<= 15 minutes on 2 idle cores).
2. The smallest Core ML file it chose, measured by ``tbopt bench`` beside the demo on the built-in
   test set: bytes (<= 30,000) and PSNR drop (<= 0.3 dB); the iOS 13 ``.mlmodel``: bytes (<= 40,000)
   and PSNR drop.
3. The CPU int8 file it chose against ``tbopt quantize`` of the unpruned demo (default options):
   both timed in one process with their runs interleaved (batch 1, all cores), latency ratio
   (<= 0.6), and its PSNR drop by ``tbopt bench``.
4. ``--resume`` on that search redoes nothing it finished (it may go on with what its time budget left); a small search interrupted with SIGINT
   (Ctrl-C) and resumed does not redo the candidates it had finished.
5. The released checkpoint with ``face_01.png`` as ``--data`` (no targets: fidelity budget): the
   chosen files and where ``pareto.png`` is, to look at.

6. (``--only-search``) the search on any machine: the demo with the default options and with
   ``--threads 1`` (a stand-in for a slower machine; run side by side with ``--parallel``): wall
   time (<= 10 min), ``TinyBeauty.mlmodel`` bytes (<= 28,000) and its PSNR drop by ``tbopt bench``
   (<= 0.3 dB), the cost model it measured, what it did not try and why it stopped; then the
   released checkpoint with ``face_01.png`` as ``--data`` and 32 crops of it as ``--calib``, with and
   without GPTQ palettes in the space (``--no-gptq``).
7. (``--only-replay``, after 6 in the same ``--work``) style1's search replayed on the demo and the
   demo's on style1 (``--from``): wall time (<= 4 min each), which targets were replayed and which
   searched.

Each ``tbopt`` is the real command in a subprocess. The machine may be shared: the load average is
printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REALDATA, ROOT, check, cpu_name, tbopt


def bench_psnr(files: list[Path], ref: Path) -> dict[str, dict]:
    """``tbopt bench REF FILES... --json`` on the built-in test set, scores only."""
    _, res = tbopt("bench", str(ref), *map(str, files), "--no-timing", "--json")
    return {row["name"]: row for row in json.loads(res.stdout)["rows"]}


def search_and_core_ml(demo: Path, work: Path) -> dict:
    out = work / "demo"
    wall, res = tbopt("optimize", str(demo), "--max-drop", "0.3", "--out", str(out), "--json", "--force")
    data = json.loads(res.stdout)
    print(f"1. tbopt optimize --max-drop 0.3 on {demo.name}: {wall:.0f} s wall ({wall / 60:.1f} min; <= 15 min: "
          f"{check(wall <= 900)}); {len(data['candidates'])} candidates, {len(data['models'])} float models, "
          f"{len(data['skipped'])} skipped, {len(data['not_tried'])} not tried")
    for target, c in data["chosen"].items():
        print(f"   {target}: {c.get('file')} {c.get('recipe', {}).get('key', c.get('reason'))}")
        for line in c.get("commands", []):
            print(f"      {line}")
    coreml = {t: Path(c["file"]) for t, c in data["chosen"].items() if t != "cpu" and c.get("file")}
    rows = bench_psnr(list(coreml.values()), demo)
    ref = rows[demo.name]["target_psnr_db"]
    smallest = min(coreml.values(), key=lambda p: rows[p.name]["size_bytes"])
    s = rows[smallest.name]
    print(f"2. smallest Core ML file {smallest.name}: {s['size_bytes']:,} bytes (<= 30,000: "
          f"{check(s['size_bytes'] <= 30_000)}), PSNR {s['target_psnr_db']:.3f} dB vs the demo's {ref:.3f} dB by tbopt "
          f"bench: drop {ref - s['target_psnr_db']:.3f} dB (<= 0.3: {check(ref - s['target_psnr_db'] <= 0.3)})")
    if "ios13" in coreml:
        m = rows[coreml["ios13"].name]
        print(f"   iOS 13 {coreml['ios13'].name}: {m['size_bytes']:,} bytes (<= 40,000: {check(m['size_bytes'] <= 40_000)}), "
              f"PSNR drop {ref - m['target_psnr_db']:.3f} dB (<= 0.3: {check(ref - m['target_psnr_db'] <= 0.3)})")
    return data


def cpu_ratio(demo: Path, work: Path, data: dict, runs: int, earlier: Path | None = None) -> None:
    chosen = data["chosen"].get("cpu", {})
    if not chosen.get("file"):
        print("3. no CPU file was chosen")
        return
    baseline = work / "demo_quantize_default.pt"
    tbopt("quantize", str(demo), "-o", str(baseline), "--force")
    from tinybeauty_cli.core.checkpoint import load_model
    from tinybeauty_cli.core.images import builtin_test_set, uint8_to_model
    from tinybeauty_cli.runtime.runners import runner_for
    from tinybeauty_cli.runtime.timing import measure_latencies

    x = uint8_to_model(builtin_test_set(256, 1).inputs)
    runners = {"tbopt quantize (unpruned)": runner_for(load_model(baseline)),
               "tbopt optimize cpu": runner_for(load_model(chosen["file"]))}
    if earlier is not None:  # an unpruned file an earlier tbopt quantize wrote, timed beside them
        runners["earlier tbopt quantize (unpruned)"] = runner_for(load_model(earlier))
    threads = os.cpu_count()
    lat = measure_latencies({k: (lambda r: lambda: r.predict(x))(r) for k, r in runners.items()},
                            runs=runs, warmup=5, threads=threads)
    a, b = lat["tbopt quantize (unpruned)"].p50_ms, lat["tbopt optimize cpu"].p50_ms
    rows = bench_psnr([Path(chosen["file"])], demo)
    ref = rows[demo.name]["target_psnr_db"]
    drop = ref - rows[Path(chosen["file"]).name]["target_psnr_db"]
    print(f"3. CPU int8 {Path(chosen['file']).name} ({chosen['recipe']['key']}, {runners['tbopt optimize cpu'].engine}) "
          f"{b:.2f} ms vs tbopt quantize of the unpruned demo ({runners['tbopt quantize (unpruned)'].engine}) {a:.2f} ms: "
          f"ratio {b / a:.3f} (<= 0.6: {check(b / a <= 0.6)}); batch 1, {threads} threads, median of {runs} interleaved "
          f"runs, {cpu_name()}; PSNR drop {drop:.3f} dB (<= 0.3: {check(drop <= 0.3)})")
    print(f"   timed with {lat['tbopt optimize cpu'].allocator}")
    if earlier is not None:
        c = lat["earlier tbopt quantize (unpruned)"].p50_ms
        print(f"   the same interleaved runs: {earlier} (an earlier tbopt quantize of the unpruned demo) {c:.2f} ms: "
              f"ratio {b / c:.3f} (<= 0.6: {check(b / c <= 0.6)})")


def resume_checks(demo: Path, work: Path, first: dict) -> None:
    wall, res = tbopt("optimize", str(demo), "--max-drop", "0.3", "--out", str(work / "demo"), "--json", "--resume")
    data = json.loads(res.stdout)
    done = {c["recipe"]["key"] for c in first["candidates"]} | {m["key"] for m in first["models"]}
    fresh = [c["recipe"]["key"] for c in data["candidates"] if not c["cached"]]
    fresh += [m["key"] for m in data["models"] if not m["cached"]]
    redone = [k for k in fresh if k in done]
    print(f"4. --resume on the search above: {wall:.0f} s, {len(data['candidates'])} candidates; of the "
          f"{len(done)} it had finished, {len(redone)} redone (0: {check(not redone)}); {len(fresh) - len(redone)} "
          f"new (what its time budget had left: {', '.join(k for k in fresh if k not in done) or 'none'})")
    out = work / "interrupted"
    args = ["optimize", str(demo), "--for", "ios13", "--for", "ios16", "--rates", "", "--fit-steps", "0",
            "--no-bits-by-layer", "--sparsities", "", "--out", str(out), "--force"]  # plain storage only: quick
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tinybeauty_cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # a shell's background job ignores SIGINT, and so would its children
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    records = out / ".tbopt-search" / "records"
    while proc.poll() is None and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait()
    finished = len(list(records.glob("*.json")))
    wall, res = tbopt(*[a for a in args if a != "--force"], "--resume", "--json")
    data = json.loads(res.stdout)
    cached = sum(c["cached"] for c in data["candidates"]) + sum(m["cached"] for m in data["models"])
    print(f"   Ctrl-C after {finished} finished evaluations (exit {proc.returncode}); --resume read {cached} of them "
          f"from the cache ({check(cached == finished)}) and made {len(data['candidates']) - cached} more in {wall:.0f} s")


def realdata(work: Path) -> None:
    ckpt, face = REALDATA / "tinybeauty_style1.pt", REALDATA / "face_01.png"
    if not (ckpt.is_file() and face.is_file()):
        print("5. ../shared/realdata is absent: skipped")
        return
    faces = work / "real_faces"
    faces.mkdir(exist_ok=True)
    (faces / face.name).write_bytes(face.read_bytes())
    wall, res = tbopt("optimize", str(ckpt), "--data", str(faces), "--out", str(work / "real"), "--json", "--force")
    data = json.loads(res.stdout)
    print(f"5. released checkpoint, --data {face.name} (no targets): {data['budget']['description']}; {wall:.0f} s")
    for target, c in data["chosen"].items():
        if c.get("file"):
            print(f"   {target}: {Path(c['file']).name} {c['size_bytes']:,} bytes, fidelity {c['fidelity_psnr_db']} dB, "
                  f"latency {c.get('latency_ms')} ms, {c['recipe']['key']}")
        else:
            print(f"   {target}: {c['reason']}")
    print(f"   pareto.png: {work / 'real' / 'pareto.png'}")


def _started(args: list[str]) -> tuple[float, subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return time.perf_counter(), subprocess.Popen([sys.executable, "-m", "tinybeauty_cli", *args], cwd=ROOT, env=env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _searches(runs: dict[str, list[str]], parallel: bool) -> dict[str, tuple[float, dict]]:
    """``tbopt optimize ARGS --json`` for each label, side by side when ``parallel``: (wall s, result)."""
    done: dict[str, tuple[float, dict]] = {}
    pending = list(runs.items())
    while pending:
        batch = pending if parallel else pending[:1]
        pending = [] if parallel else pending[1:]
        started = {label: _started(["optimize", *args, "--json", "--force"]) for label, args in batch}
        for label, (t0, proc) in started.items():
            out, _ = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"tbopt optimize ({label}) failed ({proc.returncode})")
            done[label] = (time.perf_counter() - t0, json.loads(out))
    return done


def _describe_search(label: str, wall: float, data: dict, ref: Path | None) -> None:
    print(f"   [{label}] {wall:.0f} s wall ({wall / 60:.1f} min; <= 10 min: {check(wall <= 600)}); "
          f"{len(data['candidates'])} candidates, {len(data['models'])} float models, {len(data['skipped'])} "
          f"skipped, {len(data['not_tried'])} not tried; threads {data['threads']}")
    print(f"      stopped: {data.get('stopped')}")
    costs = ", ".join(f"{k} {v['seconds_per_unit']:.3g} s" for k, v in (data.get("cost_model") or {}).items())
    print(f"      cost model: {costs}")
    for n in data["not_tried"]:
        print(f"      not tried: {n['key']} (expected {n.get('expected_s', '?')} s, {n.get('left_s', '?')} s left)")
    rows = bench_psnr([Path(c["file"]) for c in data["chosen"].values() if c.get("file")], ref) if ref else {}
    for target, c in data["chosen"].items():
        if not c.get("file"):
            print(f"      {target}: {c['reason']}")
            continue
        row = rows.get(Path(c["file"]).name, {})
        quality = (f"PSNR drop {rows[ref.name]['target_psnr_db'] - row['target_psnr_db']:.3f} dB by tbopt bench"
                   if ref and row.get("target_psnr_db") is not None else f"fidelity {c['fidelity_psnr_db']} dB")
        print(f"      {target}: {c['size_bytes']:,} B, {quality}, latency {c.get('latency_ms')} ms, {c['recipe']['key']}")


def search_anywhere(demo: Path, work: Path, parallel: bool, extra: list[str]) -> None:
    """Section 6: the demo at full and one thread, the released checkpoint with and without GPTQ
    (``extra``: options added to every search, e.g. ``--time-budget 25 --limit 25`` on a loaded machine)."""
    print(f"6. the search on any machine ({cpu_name()}; load average {os.getloadavg()}); extra options: {extra}")
    runs = {"default": [str(demo), "--out", str(work / "demo_default"), *extra],
            "--threads 1": [str(demo), "--out", str(work / "demo_threads1"), "--threads", "1", *extra]}
    for label, (wall, data) in _searches(runs, parallel).items():
        _describe_search(f"demo {label}", wall, data, demo)
        ios13 = data["chosen"].get("ios13", {})
        print(f"      TinyBeauty.mlmodel <= 28,000 B: {check(bool(ios13.get('file')) and ios13['size_bytes'] <= 28_000)}")
    ckpt, face = REALDATA / "tinybeauty_style1.pt", REALDATA / "face_01.png"
    if not (ckpt.is_file() and face.is_file()):
        print("   the released checkpoint is absent: skipped")
        return
    faces, calib = work / "style1_data", work / "style1_calib"
    _face_and_crops(face, faces, calib)
    budget = [a for i, a in enumerate(extra) if a == "--time-budget" or (i and extra[i - 1] == "--time-budget")]
    runs = {"with GPTQ": [str(ckpt), "--data", str(faces), "--calib", str(calib), "--out", str(work / "style1_gptq"),
                          *budget],
            "--no-gptq": [str(ckpt), "--data", str(faces), "--calib", str(calib), "--out", str(work / "style1_plain"),
                          "--no-gptq", *budget]}
    print(f"   style1, --data {face.name}, --calib 32 crops of it (load average {os.getloadavg()})")
    for label, (wall, data) in _searches(runs, parallel).items():
        _describe_search(f"style1 {label}", wall, data, None)
    print(f"   load average at the end {os.getloadavg()}")


def replay_figures(demo: Path, work: Path) -> None:
    """Section 7: each search of section 6 replayed on the other checkpoint (``--from``): wall time
    (<= 4 min), which targets were replayed and which searched, and the files."""
    ckpt = REALDATA / "tinybeauty_style1.pt"
    pairs = {"style1's search on the demo": (work / "style1_gptq", [str(demo)], demo),
             "the demo's search on style1": (work / "demo_default",
                                             [str(ckpt), "--data", str(work / "style1_data"), "--calib",
                                              str(work / "style1_calib")], None)}
    print(f"7. replay ({cpu_name()}; load average {os.getloadavg()})")
    for label, (source, args, ref) in pairs.items():
        if not (source / "search.json").is_file() or not Path(args[0]).is_file():
            print(f"   {label}: {source / 'search.json'} or {args[0]} is absent (run --only-search first): skipped")
            continue
        out = work / ("replay_" + source.name)
        runs = {label: [*args, "--from", str(source), "--out", str(out)]}
        for _, (wall, data) in _searches(runs, parallel=False).items():
            print(f"   [{label}] {wall:.0f} s wall ({wall / 60:.1f} min; <= 4 min: {check(wall <= 240)})")
            for target, told in (data.get("replay") or {}).get("targets", {}).items():
                print(f"      {target}: {told['status']}"
                      + (f" ({told['recipe']})" if told.get("recipe") else "")
                      + (f": {told['reason']}" if told.get("reason") else "")
                      + (f"; {told['size_bytes']:,} B at {told['quality_db']} dB" if told.get("size_bytes") else ""))
            _describe_search(label, wall, data, ref)


def _face_and_crops(face: Path, faces: Path, calib: Path, count: int = 32) -> None:
    """``faces/``: the face itself; ``calib/``: ``count`` square crops of it (60-90% of its side, at random
    places, seed 0), each resized to the face's size."""
    import numpy as np
    from PIL import Image

    faces.mkdir(parents=True, exist_ok=True)
    calib.mkdir(parents=True, exist_ok=True)
    (faces / face.name).write_bytes(face.read_bytes())
    img = Image.open(face).convert("RGB")
    side = min(img.size)
    rng = np.random.default_rng(0)
    for i in range(count):
        s = int(side * rng.uniform(0.6, 0.9))
        x, y = (int(rng.integers(0, d - s + 1)) for d in img.size)
        img.crop((x, y, x + s, y + s)).resize(img.size, Image.BICUBIC).save(calib / f"crop_{i:02d}.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "tinybeauty_cli" / "core" / "assets" / "tinybeauty_demo.pt")
    p.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a new temporary one, kept)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--skip-realdata", action="store_true")
    p.add_argument("--earlier-int8", type=Path, default=None,
                   help="an int8 file of the unpruned demo written by an earlier tbopt quantize, timed beside")
    p.add_argument("--only-realdata", action="store_true", help="only section 5 (the released checkpoint)")
    p.add_argument("--only-resume", action="store_true", help="only section 4, on the search already in --work")
    p.add_argument("--only-cpu-ratio", action="store_true", help="only section 3, on the search already in --work")
    p.add_argument("--only-search", action="store_true", help="only section 6 (the search on any machine)")
    p.add_argument("--only-replay", action="store_true",
                   help="only section 7 (replay), on the searches section 6 left in --work")
    p.add_argument("--parallel", action="store_true", help="section 6: the two searches of each pair side by side")
    p.add_argument("--search-option", action="append", default=[],
                   help="section 6: an option added to the demo searches (repeat; e.g. --search-option=--limit "
                        "--search-option=25); --time-budget also goes to the style1 ones")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="optimize_figures_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start {os.getloadavg()}; {os.cpu_count()} cores, {cpu_name()}; outputs in {work}")
    if a.only_cpu_ratio:
        cpu_ratio(a.checkpoint, work, json.loads((work / "demo" / "search.json").read_text()), a.runs, a.earlier_int8)
        return 0
    if a.only_search:
        search_anywhere(a.checkpoint, work, a.parallel, a.search_option)
        return 0
    if a.only_replay:
        replay_figures(a.checkpoint, work)
        return 0
    if a.only_resume:
        resume_checks(a.checkpoint, work, json.loads((work / "demo" / "search.json").read_text()))
        return 0
    if not a.only_realdata:
        data = search_and_core_ml(a.checkpoint, work)
        cpu_ratio(a.checkpoint, work, data, a.runs, a.earlier_int8)
        resume_checks(a.checkpoint, work, data)
    if not a.skip_realdata:
        realdata(work)
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
