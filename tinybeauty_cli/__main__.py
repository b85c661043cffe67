"""``python -m tinybeauty_cli``: the same command as ``tbopt``."""

from .cli.app import main

main()
