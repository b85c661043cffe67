"""``python -m tinybeauty_cli`` and the ``tbopt`` console script.

The CLI is imported inside :func:`main`, so that Ctrl-C during the start-up imports also ends in
one line and exit code 130 rather than a traceback.
"""

import sys


def main() -> None:
    try:
        from .cli.app import main as tbopt
    except KeyboardInterrupt:
        # cli._errors may not be imported yet: its words, written here without it.
        sys.stderr.write("Error: interrupted; no partial or temporary file was left behind\n")
        sys.exit(130)
    tbopt()


if __name__ == "__main__":
    main()
