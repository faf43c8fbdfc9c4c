"""The run layer both training apps share: run directories, checkpoints, stops, devices, processes, logging."""
