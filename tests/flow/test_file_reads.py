"""Each file is read once per command: ``tbopt run`` reads its input once and never reads back the
pruned or int8 file it wrote (the writers hand on the bytes they wrote, :class:`WrittenFile`).

Reads are counted in-process with an audit hook on the ``open`` event (every ``open()``,
``io.open`` and ``zipfile``/``torch.load`` of a path raises it) plus ``torch.jit.load`` of a path,
which opens the file in C++ where no audit event is raised."""

from __future__ import annotations

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


sys.addaudithook(_hook)


def count_reads(monkeypatch, fn) -> Counter:
    """How often each file name was opened for reading while ``fn()`` ran."""
    counts: Counter = Counter()
    real_jit_load = torch.jit.load

    def jit_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            counts[Path(f).name] += 1
        return real_jit_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", jit_load)
    _WATCHED["reads"] = counts
    try:
        fn()
    finally:
        _WATCHED.pop("reads", None)
    return counts


def test_run_reads_its_input_once_and_no_file_it_wrote(tmp_path, monkeypatch):
    src = save_small(tmp_path / "small.pt", size=32)
    cfg = RunConfig(limit=2, calib_count=2, backend="x86", runs=1, warmup=0, threads=1)
    reads = count_reads(monkeypatch, lambda: run_pipeline(src, tmp_path / "out", cfg))
    assert reads["small.pt"] == 1, reads
    assert reads[OUTPUT_FILES["pruned"]] == 0, reads
    assert reads[OUTPUT_FILES["quantized"]] == 0, reads
    assert not [name for name in reads if name.endswith(".pt") and name not in ("small.pt",)], reads


def test_optimize_reads_its_input_once(tmp_path, monkeypatch):
    """The search's candidates are its own business (each is written to the cache and scored there);
    the input checkpoint is read once, its sizes taken from those bytes."""
    from tinybeauty_cli.flow.optimize import optimize
    from tinybeauty_cli.flow.optimize_config import OptimizeConfig

    src = save_small(tmp_path / "tiny.pt", size=32)
    cfg = OptimizeConfig(targets=("ios16",), rates=(), palettes=("pal4",), sparsities=(), fit_steps=0,
                         bits_by_layer=False, calib_count=2, backend="x86", runs=1, warmup=0, threads=1,
                         min_fidelity_db=1.0, limit=2)
    reads = count_reads(monkeypatch, lambda: optimize(src, tmp_path / "out", cfg))
    assert reads["tiny.pt"] == 1, reads
