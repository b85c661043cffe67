"""Core ML files on any OS: reading a file's spec and weights, writing compact graphs, and running a
file (Core ML itself on macOS, the reference executors in ``exec/`` elsewhere)."""
