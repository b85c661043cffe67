"""Each file is read once per command: ``tbopt run`` reads its input once and never reads back the
pruned or int8 file it wrote (the writers hand on the bytes they wrote, :class:`WrittenFile`);
``tbopt optimize`` reads its input once, each Core ML file it makes once (where the export checks it),
each file of its cache it finds once, and quantizes and scores each model once.

Reads are counted in-process with an audit hook on the ``open`` event (every ``open()``,
``io.open`` and ``zipfile``/``torch.load`` of a path raises it) plus ``torch.jit.load`` of a path,
which opens the file in C++ where no audit event is raised. (coremltools reads a package's weights in
C++ too: tbopt hands it private copies of bytes it holds, never a file of the search's folder; the chosen
int8 file timed in a plain process, ``runtime.plain_timing``, is read by that process.)"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import torch

from tinybeauty_cli.flow.pipeline import run_pipeline
from tinybeauty_cli.flow.run_config import OUTPUT_FILES, RunConfig

from tests.helpers import save_small

#: Model files: PyTorch, and a Core ML file or the graph and weights of a package.
MODEL_SUFFIXES = (".pt", ".mlmodel", ".bin")
_WATCHED: dict[str, Counter] = {}  # the audit hook cannot be removed: it counts only while a test watches


def _hook(event: str, args: tuple) -> None:
    counts = _WATCHED.get("reads")
    if counts is None or event != "open" or not isinstance(args[0], (str, Path)):
        return
    mode = args[1]  # None for os.open (atomic_output's fsync of what it wrote): not a read of the content
    if mode is not None and "r" in mode and "+" not in mode and Path(args[0]).suffix in MODEL_SUFFIXES:
        counts[Path(args[0]).name] += 1
        paths = _WATCHED.get("paths")
        if paths is not None:
            paths[str(Path(args[0]).resolve())] += 1


sys.addaudithook(_hook)


def count_reads(monkeypatch, fn, paths: Counter | None = None) -> Counter:
    """How often each file name was opened for reading while ``fn()`` ran (and, into ``paths``, each
    file by its resolved path)."""
    counts: Counter = Counter()
    real_jit_load = torch.jit.load

    def jit_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            counts[Path(f).name] += 1
            if paths is not None:
                paths[str(Path(f).resolve())] += 1
        return real_jit_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", jit_load)
    _WATCHED["reads"] = counts
    if paths is not None:
        _WATCHED["paths"] = paths
    try:
        fn()
    finally:
        _WATCHED.pop("reads", None)
        _WATCHED.pop("paths", None)
    return counts


def test_run_reads_its_input_once_and_no_file_it_wrote(tmp_path, monkeypatch):
    src = save_small(tmp_path / "small.pt", size=32)
    cfg = RunConfig(limit=2, calib_count=2, backend="x86", runs=1, warmup=0, threads=1)
    reads = count_reads(monkeypatch, lambda: run_pipeline(src, tmp_path / "out", cfg))
    assert reads["small.pt"] == 1, reads
    assert reads[OUTPUT_FILES["pruned"]] == 0, reads
    assert reads[OUTPUT_FILES["quantized"]] == 0, reads
    assert not [name for name in reads if name.endswith(".pt") and name not in ("small.pt",)], reads


def in_folder(paths: Counter, folder: Path) -> dict[str, int]:
    """The reads of files in ``folder`` by their path there; a read in the temporary place a file was
    written to before it was renamed into place (``core.files.atomic_output``) counts as a read of it."""
    root, counts = str(folder.resolve()) + "/", Counter()
    for path, n in paths.items():
        if path.startswith(root):
            counts[re.sub(r"\.tbopt-\w+\.tmp/", "", path[len(root):])] += n
    return dict(counts)


def _count_calls(monkeypatch, module, name: str, key, calls: Counter | None = None) -> Counter:
    """Calls of ``module.name``, counted by ``key(*args)`` (into ``calls``)."""
    calls = Counter() if calls is None else calls
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key(*args)] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_small_optimize_reads_each_file_once_quantizes_and_scores_each_model_once(tmp_path, monkeypatch):
    """A small search (a pruned model, Core ML for iOS 13 and 16, int8 for the CPU with the engine
    ranked) reads its input once and each file of its cache at most once (none it made in this run),
    quantizes each CPU candidate once and scores each model once per image set; so does the same
    search resumed from its cache (each cached file read once, verified from those bytes)."""
    from tinybeauty_cli.core.fingerprint import weights_fingerprint
    from tinybeauty_cli.flow import quantize as flow_quantize
    from tinybeauty_cli.flow import optimize_make
    from tinybeauty_cli.flow.optimize import optimize
    from tinybeauty_cli.flow.optimize_config import CACHE_DIR, OptimizeConfig
    from tinybeauty_cli.measure import evaluate as measure_evaluate
    from tinybeauty_cli.measure.evaluate import model_key

    src = save_small(tmp_path / "tiny.pt", size=32)
    out = tmp_path / "out"
    cfg = OptimizeConfig(targets=("ios13", "ios16", "cpu"), rates=(0.5,), lower_rates=(), finetune_steps=(2,),
                         full_res_rates=(), palettes=("pal4",), sparsities=(), gptq=False, fit_steps=0,
                         bits_by_layer=False, calib_count=2, backend="auto", runs=1, warmup=0, threads=1,
                         min_fidelity_db=1.0, int8_min_psnr_db=1.0, limit=2)
    for resumed in (False, True):
        quantized = _count_calls(monkeypatch, flow_quantize, "quantize_module", lambda m, *a: weights_fingerprint(m))
        scored: Counter = Counter()
        for module in (measure_evaluate, optimize_make):
            _count_calls(monkeypatch, module, "evaluate",
                         lambda runner, images, *a: (model_key(runner, runner), images.source), scored)
        paths: Counter = Counter()
        done = []
        reads = count_reads(monkeypatch, lambda: done.append(optimize(src, out, cfg, resume=resumed)), paths)
        cpu_made = [c for c in done[0].candidates if c.recipe.is_cpu and not c.cached]
        files = in_folder(paths, out)
        assert reads["tiny.pt"] == 1, reads
        assert all(n <= 1 for n in files.values()), files
        # the chosen files' copies in --out are read once (their SHA-256 checked before they are renamed
        # into place); the cache's pruned and int8 files
        made = [f for f in files if f.startswith(CACHE_DIR) and f.endswith(".pt")]
        if not resumed:  # the pruned and int8 files were made in this run: neither is read back
            assert not made, files
        else:
            assert made, files
        assert all(n == 1 for n in quantized.values()), quantized
        assert len(quantized) == len(cpu_made) == (0 if resumed else 2), quantized
        assert all(n == 1 for n in scored.values()), scored
