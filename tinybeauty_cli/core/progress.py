"""How library functions report progress without knowing about the terminal.

Library code calls ``with progress.task("calibrating", total=32) as advance: advance(1)``
and ``progress.note("...")``; the CLI passes a Rich implementation, tests and
scripts the silent default.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Callable[..., None]]:
        """A context whose value ``advance(n=1, **fields)`` moves the bar; fields (e.g. ``loss``) are shown."""

    def note(self, message: str) -> None:
        """A one-line status or warning for the user (stderr in the CLI)."""


class SilentProgress:
    """Reports nothing; notes are kept in :attr:`notes` for callers that want them."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        yield lambda n=1, **fields: None

    def note(self, message: str) -> None:
        self.notes.append(message)
