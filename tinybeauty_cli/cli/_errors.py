"""One place turns errors into words: ``Error: ...`` on stderr, a hint, an exit code.

Every failure looks the same, whoever detects it:

- a bad option value or combination (Typer's parser or the library's checks): ``Error: ...``, then
  ``Hint: ...`` (by default ``see 'tbopt CMD --help'``), exit code 2;
- a runtime or input error: ``Error: ...`` and an optional ``Hint: ...``, exit code 1;
- Ctrl-C at any moment: one ``Error: interrupted ...`` line, exit code 130.

:class:`TbOptGroup` is the Typer group of ``tbopt``: it runs the parser without Typer's own error
printing and prints its usage errors here; :func:`handle_errors` wraps each command.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Sequence, TypeVar

import typer
from typer.core import TyperGroup

from ..core.errors import TbOptError
from ..core.files import scratch_tempdir

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of a command ended by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130
INTERRUPTED = "interrupted; no partial or temporary file was left behind"


def _debug() -> bool:
    return os.environ.get("TBOPT_DEBUG", "") not in ("", "0")


def say(message: str, hint: str | None = None) -> None:
    line = " ".join(message.split())  # one line, however the message was built
    sys.stderr.write(f"Error: {line}\n")
    if hint:
        sys.stderr.write(f"Hint: {' '.join(hint.split())}\n")
    sys.stderr.flush()


def help_hint(ctx: Any = None) -> str:
    """``see 'tbopt CMD --help'`` for the command being run (the top-level help outside one)."""
    names = []
    while ctx is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    command = " ".join(["tbopt", *reversed(names[:-1])])
    return f"see '{command} --help'"


def _click() -> tuple[Any, Any]:
    """Typer's click (its ``exceptions`` and ``globals``): vendored as ``typer._click`` by recent
    Typer, the ``click`` package before."""
    try:
        from typer._click import exceptions  # noqa: PLC0415 - already imported by Typer
        from typer._click import globals as click_globals  # noqa: PLC0415
    except ImportError:  # Typer that depends on click
        from click import exceptions  # noqa: PLC0415
        from click import globals as click_globals  # noqa: PLC0415
    return exceptions, click_globals


def _current_context() -> Any:
    return _click()[1].get_current_context(silent=True)


def handle_errors(fn: F) -> F:
    """Wrap a command: library errors -> one line and exit 1 (2 for usage), no traceback.

    Ctrl-C passes through: Typer turns it into exit code 130 and :class:`TbOptGroup` says so.

    The command runs with a private temporary folder (see ``core.files.scratch_tempdir``), removed
    however it ends, so nothing a library writes to the temporary folder outlives it.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with scratch_tempdir():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except TbOptError as exc:
            if _debug():
                raise
            hint = exc.hint if exc.hint or exc.exit_code != 2 else help_hint(_current_context())
            say(str(exc), hint)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            say("out of memory", "use --limit or smaller inputs")
            raise typer.Exit(1) from None
        except OSError as exc:  # the machine's (permissions, a full disk), not tbopt's
            if _debug():
                raise
            where = f": {exc.filename}" if exc.filename else ""
            say(f"{exc.strerror or type(exc).__name__}{where}")
            raise typer.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _debug():
                raise
            say(f"internal error: {type(exc).__name__}: {exc}",
                "this is a bug in tbopt; rerun with TBOPT_DEBUG=1 for the traceback and report it")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class TbOptGroup(TyperGroup):
    """The ``tbopt`` group: Typer's parser, with usage errors and Ctrl-C printed as every other error.

    Typer prints a usage error in a boxed panel (or click's several lines); the library's usage
    errors are one ``Error:`` line. Here both are the latter, so a bad value looks the same
    whichever layer refuses it.

    Every command's options get plain metavars here (``_options.readable_metavars``), whatever
    Typer version builds them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ._options import readable_metavars  # noqa: PLC0415 - _options imports this module's neighbours

        super().__init__(*args, **kwargs)
        readable_metavars(self)  # --version
        for command in self.commands.values():
            readable_metavars(command)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        exceptions = _click()[0]
        no_args = getattr(exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
        aborts = (typer.Abort, getattr(exceptions, "Abort", typer.Abort), KeyboardInterrupt)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
            if code == INTERRUPTED_EXIT:  # Typer turns Ctrl-C anywhere in a command into this code
                say(INTERRUPTED)
        except no_args as exc:  # `tbopt` alone: the help, as Typer shows it
            if not _rich_help():
                exc.show()
            code = exc.exit_code
        except exceptions.UsageError as exc:
            say(exc.format_message(), help_hint(exc.ctx))
            code = exc.exit_code
        except exceptions.ClickException as exc:
            say(exc.format_message())
            code = exc.exit_code
        except aborts:
            say(INTERRUPTED)
            code = INTERRUPTED_EXIT
        if standalone_mode:
            sys.exit(code)
        return code


def _rich_help() -> bool:
    """Typer prints a rich help itself when it builds a NoArgsIsHelpError's message."""
    from typer.core import HAS_RICH  # noqa: PLC0415

    return bool(HAS_RICH)
