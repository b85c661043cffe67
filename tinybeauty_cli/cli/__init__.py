"""The ``tbopt`` command line: one thin module per command, registered in :mod:`.app`."""
