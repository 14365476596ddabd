"""Training: configs, the loader, the one DeepSpeed module, the Task protocol and the trainer, checkpoints,
metrics, the loader of pretrained weights, and the memory plan (docs/training.md)."""
