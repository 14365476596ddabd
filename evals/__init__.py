"""Scoring models: probes and fine-tuning on frozen or trained encoders, the tokenizer's evaluation, figures.

On top of train/ (same loader, trainer and weights loader); the commands (lvmae_cli) sit above it.
"""
