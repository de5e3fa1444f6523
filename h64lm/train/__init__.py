"""The training loop and what surrounds it: processes, precision, optimizer, checkpoints, metrics."""
