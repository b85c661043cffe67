"""One place turns errors into words: ``Error: ...`` on stderr, a hint, an exit code."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import typer

from ..core.errors import TbOptError

F = TypeVar("F", bound=Callable[..., Any])


def _debug() -> bool:
    return os.environ.get("TBOPT_DEBUG", "") not in ("", "0")


def _say(message: str, hint: str | None = None) -> None:
    line = " ".join(message.split())  # one line, however the message was built
    sys.stderr.write(f"Error: {line}\n")
    if hint:
        sys.stderr.write(f"Hint: {' '.join(hint.split())}\n")
    sys.stderr.flush()


def handle_errors(fn: F) -> F:
    """Wrap a command: library errors -> one line and exit 1 (2 for usage), no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except TbOptError as exc:
            if _debug():
                raise
            _say(str(exc), exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            _say("interrupted; no partial output was left behind")
            raise typer.Exit(130) from None
        except MemoryError:
            _say("out of memory", "use --limit or smaller inputs")
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _debug():
                raise
            _say(f"internal error: {type(exc).__name__}: {exc}",
                 "this is a bug in tbopt; rerun with TBOPT_DEBUG=1 for the traceback and report it")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
