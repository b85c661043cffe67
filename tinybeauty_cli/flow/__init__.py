"""What a command runs: open each file once, transform in memory, evaluate once, write atomically,
report. ``pipeline`` chains the stages for ``tbopt run``."""
