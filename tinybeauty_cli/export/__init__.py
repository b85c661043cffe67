"""Core ML export as a transform, module in and Core ML model out: config (torch-free), prepare,
convert, metadata, validate and palettes. Writing the file is the command's job (flow.export)."""
