"""All terminal output: Rich tables, JSON, progress and notes.

Data goes to stdout; progress, notes and warnings to stderr. Progress is drawn as bars when
stderr is a terminal; otherwise (a log, CI, ``nohup``, ``2> file``) each long step prints plain
lines: when it starts, at least every :data:`PLAIN_INTERVAL_S` seconds (step, done/total, elapsed,
eta) and when it ends. Quiet under ``--json``/``--quiet``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Piped output is read by people and tools alike: do not squeeze wide tables into 80 columns.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
stderr = Console(stderr=True, soft_wrap=True)


#: Without a terminal on stderr, a long step prints a line at least this often (seconds).
PLAIN_INTERVAL_S = 10.0

_write_lock = threading.Lock()


class Output:
    """One command's output mode."""

    def __init__(self, json_mode: bool = False, quiet: bool = False, interval: float = PLAIN_INTERVAL_S):
        self.json_mode = json_mode
        self.quiet = quiet
        self.interval = interval
        self._bar: Progress | None = None  # one Rich display for every open task (tasks nest)
        self._open = 0
        self._live = False  # a live table is drawn: progress would fight it for the terminal

    @property
    def show_progress(self) -> bool:
        return not (self.json_mode or self.quiet or self._live)

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

    @property
    def draws_bars(self) -> bool:
        """Bars when stderr (where progress goes) is a terminal; plain lines otherwise."""
        return self.show_progress and stderr.is_terminal

    # -- progress (implements tinybeauty_cli.core.progress.Progress) -------------------
    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        if not self.show_progress:
            yield lambda n=1, **fields: None
        elif self.draws_bars:
            with self._bar_task(description, total) as advance:
                yield advance
        else:
            with PlainTask(description, total, self.interval) as advance:
                yield advance

    @contextlib.contextmanager
    def _bar_task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        if self._bar is None:
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}")]
            self._bar = Progress(*columns, console=stderr, transient=False)
            self._bar.start()
        bar = self._bar
        self._open += 1
        tid = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            info = "  ".join(f"{k} {_fmt_field(v)}" for k, v in fields.items())
            bar.update(tid, advance=n, info=info) if info else bar.advance(tid, n)

        try:
            yield advance
        finally:
            self._open -= 1
            if self._open == 0:
                bar.stop()
                self._bar = None

    def note(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message, highlight=False, markup=False)

    def model_or_demo(self, path: Any) -> Any:
        """``path``, or the bundled demo checkpoint when none was given, saying so in one line."""
        if path is not None:
            return path
        from ..core.paths import demo_checkpoint  # noqa: PLC0415

        demo = demo_checkpoint()
        self.note(f"Note: no model given: using the bundled demo checkpoint ({demo})")
        return demo

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


class PlainTask:
    """A long step as plain lines on stderr, for logs: one when it starts, then at least every
    ``interval`` seconds (done/total, elapsed, eta, the latest fields) from a timer thread, so a
    step whose single unit takes minutes still reports, and one when it ends."""

    def __init__(self, description: str, total: int | None, interval: float = PLAIN_INTERVAL_S):
        self.description, self.total, self.interval = description, total, interval
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.started = self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tbopt-progress", daemon=True)

    def __enter__(self) -> Callable[..., None]:
        self._print("started" + (f" ({self.total} to do)" if self.total else ""))
        self._thread.start()
        return self.advance

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._print(f"done in {_clock(time.monotonic() - self.started)}")

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if time.monotonic() - self.last >= self.interval:
            self._print(self.status())

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = []
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and 0 < self.done < self.total:
            parts.append(f"eta {_clock(elapsed / self.done * (self.total - self.done))}")
        parts += [f"{k} {_fmt_field(v)}" for k, v in self.fields.items()]
        return ", ".join(parts)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            if time.monotonic() - self.last >= self.interval:
                self._print(self.status())

    def _print(self, text: str) -> None:
        self.last = time.monotonic()
        with _write_lock:
            sys.stderr.write(f"{self.description}: {text}\n")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
