"""Named model sizes, in one table.

Encoder sizes are VideoMAE's (ViT-S/B/L/H); decoders are 4 blocks, narrower than the encoder, as in
VideoMAE. `tiny` trains on a laptop CPU in seconds and is what tests and the demo use.
"""

from __future__ import annotations

import copy
from dataclasses import fields

from lvmae.config import MAEConfig

# name: (encoder embed_dim, depth, heads), (decoder embed_dim, depth, heads)
MODEL_PRESETS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "tiny": ((96, 4, 3), (64, 2, 2)),
    "small": ((384, 12, 6), (192, 4, 3)),
    "base": ((768, 12, 12), (384, 4, 6)),
    "large": ((1024, 24, 16), (512, 4, 8)),
    "huge": ((1280, 32, 16), (640, 4, 8)),
}


def apply_preset(cfg: MAEConfig) -> MAEConfig:
    """Copy of `cfg` with encoder/decoder sizes left at None taken from its preset."""
    if cfg.preset not in MODEL_PRESETS:
        from lvmae.config import ConfigError

        raise ConfigError(
            f"model.preset: unknown preset {cfg.preset!r}; choose from {', '.join(MODEL_PRESETS)}"
        )
    out = copy.deepcopy(cfg)
    enc, dec = MODEL_PRESETS[cfg.preset]
    for part, sizes in ((out.encoder, enc), (out.decoder, dec)):
        for name, value in zip(("embed_dim", "depth", "num_heads"), sizes):
            if getattr(part, name) is None:
                setattr(part, name, value)
    return out


def preset_config(name: str, **video: int) -> MAEConfig:
    """A resolved MAEConfig for a preset; keyword arguments set VideoSpec fields (num_frames=128, ...).

    Not validated here (masking may still be adjusted for small grids): the model validates on build.
    """
    cfg = MAEConfig(preset=name)
    valid = {f.name for f in fields(cfg.video)}
    for key, value in video.items():
        if key not in valid:
            raise TypeError(f"unknown VideoSpec field {key!r}")
        setattr(cfg.video, key, value)
    return apply_preset(cfg)
