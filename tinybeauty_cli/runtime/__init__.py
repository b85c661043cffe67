"""Running models: the PyTorch runners, the table that opens any file tbopt knows as a runner, the
contexts that borrow global PyTorch state (threads, int8 engine), and latency timing."""
