"""The trainer (single process or DDP), corruption, end-of-epoch work and the training report."""
