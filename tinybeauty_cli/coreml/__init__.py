"""Core ML files: reading them (spec, weights), writing compact graphs, and running them (runner, exec)."""
