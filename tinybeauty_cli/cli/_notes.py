"""Warnings about how models were opened (Core ML options that had no effect, and why)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from . import _output

if TYPE_CHECKING:  # core.runner pulls numpy and torch; the CLI builds its --help without them
    from ..core.runner import Runner


def warn_runner_notes(out: _output.Output, runners: Iterable[Runner], compute_units_given: bool,
                      fp16_emulation_given: bool) -> None:
    runners = list(runners)
    for runner in runners:
        for note in getattr(runner, "notes", ()):
            out.warn(note)
    if not any(r.kind == "coreml" for r in runners):
        flags = [f for f, given in (("--compute-units", compute_units_given),
                                    ("--fp16-emulation", fp16_emulation_given)) if given]
        if flags:
            out.warn(f"{' and '.join(flags)} only affect Core ML models (.mlpackage, .mlmodel); ignored here")
