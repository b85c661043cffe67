"""Ctrl-C noted as well as raised, so that one interrupt ends a command even where a library drops it.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread is. Code that
catches every exception around an import or a callback drops it: coremltools' import tries its
optional dependencies (scikit-learn, ...) under a bare ``except:``, PyTorch's C extension imports
numpy and goes on if that fails, and C++ that calls back into Python (fx tracing, an optimizer's
first step) imports ``torch._dynamo`` there. The command then goes on, or trips later over a
half-imported module. The handler installed here raises ``KeyboardInterrupt`` as Python's own
does and also notes the interrupt; :func:`check` raises it again where it may have been dropped:
before an output is renamed into place (``core.files``), as progress moves, and when the command
returns or fails (``cli._errors``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_received = False
_watching = 0  # inside watched() blocks (or the whole process after install())


def _handler(signum: int, frame: Any) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def received() -> bool:
    """True once an interrupt arrived while :func:`watched` was in force."""
    return _received


def check() -> None:
    """Raise ``KeyboardInterrupt`` if an interrupt arrived while watched, even one that some code caught
    and dropped (outside a command, e.g. a library caller's own code, nothing is raised)."""
    if _received and _watching:
        raise KeyboardInterrupt


def install() -> None:
    """Note interrupts from now on (for the whole process: the console script's start-up). A SIGINT
    that is ignored (a background job started without job control) stays ignored."""
    global _watching
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)
        _watching += 1


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Note interrupts for the length of a block (a command), Python's handler restored after;
    :func:`received` still tells after the block whether one arrived in it."""
    global _received, _watching
    _received = False  # what happened before (an earlier command in this process) is not this block's
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    ours = previous is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _handler)
    _watching += 1
    try:
        yield
    finally:
        _watching -= 1
        if ours:
            signal.signal(signal.SIGINT, previous)
