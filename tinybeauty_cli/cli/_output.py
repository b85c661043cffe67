"""All terminal output: Rich tables, JSON, progress bars and notes.

Data goes to stdout; progress, notes and warnings to stderr. Progress bars are
quiet under ``--json``/``--quiet`` or when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Piped output is read by people and tools alike: do not squeeze wide tables into 80 columns.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
stderr = Console(stderr=True, soft_wrap=True)


class Output:
    """One command's output mode."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self._live = False  # a live table is drawn: progress bars would fight it for the terminal

    @property
    def show_progress(self) -> bool:
        return not (self.json_mode or self.quiet or self._live) and sys.stdout.isatty()

    @contextlib.contextmanager
    def live_table(self, title: str, columns: Sequence[str],
                   right: Sequence[str] = ()) -> Iterator[Callable[[Sequence[Any]], None]]:
        """A table on stderr that grows as rows come (``add(row)``): redrawn in place on a terminal, one
        plain line per row otherwise, nothing under ``--json``/``--quiet``. Progress bars rest meanwhile."""
        if self.json_mode or self.quiet:
            yield lambda row: None
            return
        if not stderr.is_terminal:
            def add_line(row: Sequence[Any]) -> None:
                stderr.print("  ".join(f"{c}={cell(v)}" for c, v in zip(columns, row)), highlight=False, markup=False)

            yield add_line
            return
        from rich.live import Live  # noqa: PLC0415 - only for a terminal

        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c, justify="right" if c in right else "left", overflow="fold")
        self._live = True
        try:
            with Live(t, console=stderr, auto_refresh=False, vertical_overflow="visible") as live:
                def add(row: Sequence[Any]) -> None:
                    t.add_row(*[cell(v) for v in row])
                    live.refresh()

                yield add
        finally:
            self._live = False

    # -- progress (implements tinybeauty_cli.progress.Progress) -------------------
    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        if not self.show_progress:
            yield lambda n=1, **fields: None
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*columns, console=stderr, transient=False) as bar:
            tid = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, **fields: Any) -> None:
                info = "  ".join(f"{k} {_fmt_field(v)}" for k, v in fields.items())
                bar.update(tid, advance=n, info=info) if info else bar.advance(tid, n)

            yield advance

    def note(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        stderr.print(f"Warning: {message}", style="yellow", highlight=False, markup=False)

    # -- data ------------------------------------------------------------------------
    def emit(self, result: Any, render: Callable[["Output", Any], None]) -> None:
        """A command's result, the one way out: JSON under ``--json``, else ``render(self, result)``.

        ``result`` is an object with ``to_dict()`` or a plain dict; ``render`` draws the human view.
        """
        if self.json_mode:
            self.json(result)
        else:
            render(self, result)

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
        sys.stdout.flush()

    def table(self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              caption: str | None = None, right: Sequence[str] = ()) -> None:
        t = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
        for c in columns:
            t.add_column(c, justify="right" if c in right else "left", overflow="fold")
        for r in rows:
            t.add_row(*[cell(v) for v in r])
        stdout.print(t)

    def fields(self, title: str | None, items: Mapping[str, Any]) -> None:
        t = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in items.items():
            t.add_row(k, cell(v))
        stdout.print(t)

    def line(self, text: str = "") -> None:
        stdout.print(text, highlight=False, markup=False)


def _fmt_field(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def kb(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 1000:,.1f}"


def to_jsonable(obj: Any) -> Any:
    """Numbers, strings, lists and dicts only; inf/nan become strings (JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            return str(obj)
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return to_jsonable(obj.item())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)
