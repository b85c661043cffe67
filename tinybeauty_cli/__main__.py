"""``python -m tinybeauty_cli`` and the ``tbopt`` console script.

The CLI is imported inside :func:`main`, so that Ctrl-C during the start-up imports also ends in
one line and exit code 130 rather than a traceback; interrupts are noted from the start
(``core.interrupts``), so one that a library drops still ends the command.
"""

import sys


def main() -> None:
    from .core import interrupts  # the standard library only: noted from the first moment (see there)

    interrupts.install()
    try:
        from .cli.app import main as tbopt
    except KeyboardInterrupt:
        # cli._errors may not be imported yet: its words, written here without it.
        sys.stderr.write("Error: interrupted; no partial or temporary file was left behind\n")
        sys.exit(130)
    tbopt()


if __name__ == "__main__":
    main()
