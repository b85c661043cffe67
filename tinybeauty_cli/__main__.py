"""``python -m tinybeauty_cli``: the same CLI as ``tbopt``."""

from .cli.app import main

main()
