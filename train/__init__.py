"""Training: configs, loader, DeepSpeed engine, checkpoints, metrics."""
