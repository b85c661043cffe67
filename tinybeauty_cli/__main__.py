"""``python -m tinybeauty_cli`` and the ``tbopt`` console script.

The CLI is imported inside :func:`main`, so that Ctrl-C during the start-up imports also ends in
one line and exit code 130 rather than a traceback; interrupts are noted from the start
(``core.interrupts``), so one that a library drops still ends the command.
"""

import atexit
import os
import sys

INTERRUPTED_EXIT = 130


def main() -> None:
    from .core import interrupts  # the standard library only: noted from the first moment (see there)

    interrupts.install()
    try:
        from .cli.app import main as tbopt
    except KeyboardInterrupt:
        # cli._errors may not be imported yet: its words, written here without it.
        sys.stderr.write("Error: interrupted; no partial or temporary file was left behind\n")
        _exit_interrupted()
    try:
        tbopt()
    except SystemExit as exc:
        if exc.code == INTERRUPTED_EXIT:
            _exit_interrupted()
        raise


def _exit_interrupted() -> None:
    """Exit with code 130 after the usual clean-up (exit handlers, flushed output).

    An interrupt that lands while a native library runs Python through ``PyRun_String`` (pybind11's
    ``exec``) marks it for good as unhandled, however it is handled after: at exit CPython then
    kills the process with SIGINT instead of returning the code it was given. The command has
    already said it was interrupted and removed its partial files; the exit code says so too.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
